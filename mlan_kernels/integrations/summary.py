"""Parameter counts per component of a patched model / LaVIN assembly.

    print(summary(model))
    component                          trainable        total
    llama adapters (32 attn)           2,621,760    2,621,760
    ...
Works on the `meta` device (counts shapes only), so LaVIN-7B-sized configurations cost nothing.
"""
from .checkpoint import trainable_modules


def parameter_breakdown(model):
    """[(component, trainable, total)]: adapters per component and site, neck, modality
    embedding, then everything else ("base"), and a final "total" row."""
    rows, seen = {}, set()
    for prefix, module in trainable_modules(model).items():
        if prefix.count(".") >= 3:                       # "llama.layers.3.attn" -> "llama adapters (attn)"
            component, _, _, site = prefix.split(".")
            label = f"{component} adapters ({site})"
        else:
            label = prefix
        for parameter in module.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            trainable, total = rows.get(label, (0, 0))
            rows[label] = (trainable + parameter.numel() * parameter.requires_grad,
                           total + parameter.numel())
    base = [p for p in model.parameters() if id(p) not in seen]
    rows["base"] = (sum(p.numel() for p in base if p.requires_grad), sum(p.numel() for p in base))
    result = [(label, trainable, total) for label, (trainable, total) in rows.items()]
    result.append(("total", sum(r[1] for r in result), sum(r[2] for r in result)))
    return result


def count_trainable_parameters(model) -> int:
    """Number of parameters with requires_grad (each shared tensor counted once)."""
    return sum({id(p): p.numel() for p in model.parameters() if p.requires_grad}.values())


def summary(model) -> str:
    """A table of parameter_breakdown(model), one row per component (returns the text)."""
    rows = parameter_breakdown(model)
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"{'component':<{width}}{'trainable':>15}{'total':>17}"]
    lines += [f"{label:<{width}}{trainable:>15,}{total:>17,}" for label, trainable, total in rows]
    return "\n".join(lines)
