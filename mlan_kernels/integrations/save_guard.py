"""save_pretrained on a patched model: stock transformers would drop the adapted norms' weights
(or the merged biases) silently, so while MM-Adapters are in the module tree `save_pretrained`
raises and names what to use instead. `mk.patch` installs the guard, `mk.unpatch` removes it.
"""
from .merge import is_merged
from .patching import AdaptedNorm


class SaveGuard:
    """Stands in for save_pretrained on one patched transformers model (an instance attribute,
    picklable and deep-copyable): the class's own save_pretrained when no adapter is in the
    module tree (inside `unpatched`, after `unpatch`), else RuntimeError (stock transformers
    would drop the adapted norms' weights, or the merged biases, silently)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        module = self.module
        if any(isinstance(child, AdaptedNorm) for child in module.modules()) or is_merged(module):
            raise RuntimeError(
                f"{type(module).__name__}.save_pretrained would write a checkpoint transformers loads "
                f"incompletely (MM-Adapters in the module tree); use mk.export_merged(model, dir, modality) "
                f"for a merged model, mk.save_adapters(model, dir) for the adapters, or "
                f"`with mk.unpatched(model): model.save_pretrained(dir)` for the base")
        return type(module).save_pretrained(module, *args, **kwargs)


def install_save_guard(model):
    """Make save_pretrained of every transformers model inside `model` (not PEFT wrappers, whose
    save_pretrained writes their own adapters) raise while MM-Adapters are in it."""
    for module in model.modules():
        if hasattr(type(module), "save_pretrained") and hasattr(module, "config") \
                and not hasattr(module, "peft_config"):
            module.__dict__["save_pretrained"] = SaveGuard(module)


def remove_save_guard(model):
    """Undo install_save_guard."""
    for module in model.modules():
        if isinstance(module.__dict__.get("save_pretrained"), SaveGuard):
            del module.__dict__["save_pretrained"]
