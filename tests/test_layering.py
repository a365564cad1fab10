"""Imports point down the layers, on every edge. Each package's layer is declared once (LAYERS);
every import of every module under mlan_kernels, mlan_train, mlan_bench, python/ and benchmarks/
(function-level imports included) must point to a lower layer or stay within its own, programs
never import other programs, the oracle is test-only, and the README's architecture table is
rendered from the same declaration."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlan_kernels"

# The layers, bottom to top: (name, package prefixes, what a user installs for it). A module
# belongs to the layer of the longest prefix of its dotted name ("python.train_mixed" for
# python/train_mixed.py).
LAYERS = [
    ("core", ("mlan_kernels",), "torch (triton optional)"),
    ("integrations", ("mlan_kernels.integrations",), "the hf extra"),
    ("training", ("mlan_kernels.training", "mlan_kernels.data"), "the train extra"),
    ("programs", ("mlan_train", "mlan_bench"), "the train / bench extras"),
    ("scripts", ("python", "benchmarks"), "the program or layer they run"),
]
# Layers whose packages are separate programs: an import between two of their packages is
# sideways, not "within the layer".
SEPARATE_PROGRAMS = {"programs", "scripts"}
# Import cycles between modules still present, each to be removed (the modules of each, sorted):
# the benchmark's case registry
# (mlan_bench.cases.build_case imports the per-op case modules, which import cases).
ALLOWED_CYCLES = {("mlan_bench.cases", "mlan_bench.cases_adapter", "mlan_bench.cases_grad_scale",
                   "mlan_bench.cases_kl")}

RANK = {prefix: rank for rank, (_, prefixes, _) in enumerate(LAYERS) for prefix in prefixes}
SOURCES = [path for top in ("mlan_kernels", "mlan_train", "mlan_bench", "python", "benchmarks")
           for path in sorted((ROOT / top).rglob("*.py"))]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path) for path in SOURCES}


def layer_prefix(module: str):
    """The declared prefix `module` belongs to (longest match), None for a third-party module."""
    matches = [prefix for prefix in RANK if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=len) if matches else None


def imports(path: Path):
    """(line, module) for each import of a project module in `path`: relative imports resolved,
    `from package import submodule` taken as the submodule."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        for name in dict.fromkeys(names):
            if layer_prefix(name) is not None:
                yield node.lineno, name


EDGES = [(path, line, module_name(path), target) for path in SOURCES for line, target in imports(path)]


def edge_problem(source: str, target: str):
    """Why the import `source` -> `target` breaks the layering, or None."""
    source_prefix, target_prefix = layer_prefix(source), layer_prefix(target)
    source_rank, target_rank = RANK[source_prefix], RANK[target_prefix]
    if target_rank > source_rank:
        return f"points up, {LAYERS[source_rank][0]} -> {LAYERS[target_rank][0]}"
    if (target_rank == source_rank and LAYERS[source_rank][0] in SEPARATE_PROGRAMS
            and source_prefix != target_prefix):
        return f"one program imports another ({source_prefix} -> {target_prefix})"
    return None


def test_every_import_points_down_or_stays_within_its_layer():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {source} -> {target}: {problem}"
                 for path, line, source, target in EDGES
                 if (problem := edge_problem(source, target))]
    assert not offenders, "imports across the layers:\n" + "\n".join(offenders)


def test_the_rule_itself_on_known_edges():
    assert edge_problem("mlan_kernels.modules", "mlan_kernels.integrations.patching") == \
        "points up, core -> integrations"
    assert edge_problem("mlan_kernels.integrations.lavin", "mlan_kernels.data.dataset") == \
        "points up, integrations -> training"
    assert edge_problem("mlan_train.study", "mlan_bench.report") == \
        "one program imports another (mlan_train -> mlan_bench)"
    assert edge_problem("mlan_kernels.training.balance", "mlan_kernels.data.collate") is None
    assert edge_problem("python.train_mixed", "mlan_train.cli") is None
    assert edge_problem("mlan_bench.cli", "mlan_bench.runner") is None
    assert layer_prefix("mlan_kernels.integrations.tiny") == "mlan_kernels.integrations"
    assert layer_prefix("transformers.models") is None


def _cycles():
    """Strongly connected groups (> 1 module) of the module import graph; imports of a package
    (its __init__) by the package's own modules are not edges."""
    graph = {module: set() for module in MODULES}
    for _, _, source, target in EDGES:
        if target in MODULES and target != source and not source.startswith(target + "."):
            graph[source].add(target)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(tuple(sorted(group)))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for module in sorted(graph):
        if module not in index:
            visit(module)
    return set(groups)


def test_no_import_cycles_but_the_listed_ones():
    """Every allowed cycle must still exist (remove its entry when it is broken)."""
    cycles = _cycles()
    assert cycles - ALLOWED_CYCLES == set(), f"import cycles: {sorted(cycles - ALLOWED_CYCLES)}"
    assert ALLOWED_CYCLES - cycles == set(), f"broken cycles still allowed: {sorted(ALLOWED_CYCLES - cycles)}"


def test_no_runtime_module_imports_the_oracle():
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path, line, source, target in EDGES
                 if source.startswith("mlan_kernels.") and not source.startswith("mlan_kernels.reference")
                 and (target == "mlan_kernels.reference" or target.startswith("mlan_kernels.reference."))]
    assert not offenders, f"modules importing the oracle mlan_kernels.reference: {offenders}"


def test_backends_do_not_import_the_registry_or_the_ops():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {target}" for path, line, source, target in EDGES
                 if source.startswith("mlan_kernels.backends.")
                 and target.split(".")[:2] in (["mlan_kernels", "dispatch"], ["mlan_kernels", "ops"])]
    assert not offenders, f"backends importing mlan_kernels.dispatch or mlan_kernels.ops: {offenders}"


def render_layers() -> str:
    """The README's layer table, top layer first."""
    lines = [f"{'layer':<14}{'packages':<44}needs"]
    for name, prefixes, needs in reversed(LAYERS):
        packages = "   ".join(prefix.replace(".", "/") + "/" for prefix in prefixes)
        lines.append(f"{name:<14}{packages:<44}{needs}")
    return "\n".join(lines)


def test_the_readme_layer_table_is_rendered_from_the_declaration():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- layers: tests/test_layering.py -->\n```\n(.*?)\n```", readme, re.S)
    assert block, "README.md: no ```-block after <!-- layers: tests/test_layering.py -->"
    assert block.group(1) == render_layers(), "README.md's layer table; render it anew:\n" + render_layers()


def test_importing_and_running_the_package_loads_neither_oracle_nor_programs():
    code = ("import sys, torch, mlan_kernels as mk\nPROGRAMS = ('mlan_train', 'mlan_bench')\n"
            "x = torch.randn(2, 3, 16, requires_grad=True)\n"
            "mk.mm_adapter(x, torch.randn(4, 16), torch.zeros(4), torch.randn(2, 16, 2),\n"
            "              torch.zeros(2, 16), torch.randn(2, 16), torch.zeros(2), groups=2).sum().backward()\n"
            "mk.kl_div_logits(torch.randn(3, 5), torch.randn(3, 5))\n"
            "loaded = [m for m in sys.modules if m.startswith(('mlan_kernels.reference',) + PROGRAMS)]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
