"""Imports point down: the oracle is test-only, backends never import the registry, and the
library never imports the programs (mlan_train, mlan_bench), which live beside it."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlan_kernels"
ORACLE_USERS = ("reference",)
PROGRAMS = ("mlan_train", "mlan_bench")


def _imported_modules(path: Path):
    """Absolute names of the package modules `path` imports (relative imports resolved)."""
    package = ["mlan_kernels"] + list(path.relative_to(PACKAGE).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[:len(package) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _modules(exclude=()):
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0]
        if top not in exclude:
            yield path, set(_imported_modules(path))


def test_no_runtime_module_imports_the_oracle():
    offenders = [str(path.relative_to(PACKAGE)) for path, names in _modules(ORACLE_USERS)
                 if any(name == "mlan_kernels.reference" or name.startswith("mlan_kernels.reference.")
                        for name in names)]
    assert not offenders, f"modules importing the oracle mlan_kernels.reference: {offenders}"


def test_the_library_never_imports_the_programs():
    offenders = [str(path.relative_to(PACKAGE)) for path, names in _modules()
                 if any(name.split(".")[0] in PROGRAMS for name in names)]
    assert not offenders, f"mlan_kernels modules importing {PROGRAMS}: {offenders}"


def test_backends_do_not_import_the_registry_or_the_ops():
    offenders = [str(path.relative_to(PACKAGE)) for path, names in _modules()
                 if path.parent.name == "backends"
                 and any(name.split(".")[:2] in (["mlan_kernels", "dispatch"], ["mlan_kernels", "ops"])
                         for name in names)]
    assert not offenders, f"backends importing mlan_kernels.dispatch or mlan_kernels.ops: {offenders}"


def test_importing_and_running_the_package_loads_neither_oracle_nor_programs():
    code = (f"import sys, torch, mlan_kernels as mk\nPROGRAMS = {PROGRAMS!r}\n"
            "x = torch.randn(2, 3, 16, requires_grad=True)\n"
            "mk.mm_adapter(x, torch.randn(4, 16), torch.zeros(4), torch.randn(2, 16, 2),\n"
            "              torch.zeros(2, 16), torch.randn(2, 16), torch.zeros(2), groups=2).sum().backward()\n"
            "mk.kl_div_logits(torch.randn(3, 5), torch.randn(3, 5))\n"
            "loaded = [m for m in sys.modules if m.startswith(('mlan_kernels.reference',) + PROGRAMS)]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-2000:]
