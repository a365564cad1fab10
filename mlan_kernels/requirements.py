"""What each layer needs beyond torch, and the one error a missing extra gives.

The kernel core imports with torch alone. Each layer above it asks for its extra when it is
imported, before anything of its own is loaded:

    require_extra("hf", "mlan_kernels.integrations")
    -> ImportError: mlan_kernels.integrations needs the 'hf' extra (missing: transformers):
       pip install 'mlan-kernels[hf]'
"""
import importlib.util

# The import names each extra of pyproject.toml provides that a layer imports.
EXTRA_MODULES = {
    "hf": ("transformers", "safetensors"),
    "train": ("transformers", "safetensors", "PIL", "numpy", "tokenizers", "tqdm"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):           # a broken or blocked install counts as missing
        return False


def missing_modules(extra: str) -> list:
    """The modules of `extra` (a key of EXTRA_MODULES) that are not installed, in order."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"extra: expected one of {sorted(EXTRA_MODULES)}, got {extra!r}")
    return [module for module in EXTRA_MODULES[extra] if not _installed(module)]


def require_extra(extra: str, layer: str) -> None:
    """ImportError naming `extra` and the pip command when a module it provides is missing."""
    missing = missing_modules(extra)
    if missing:
        raise ImportError(f"{layer} needs the '{extra}' extra (missing: {', '.join(missing)}): "
                          f"pip install 'mlan-kernels[{extra}]'", name=missing[0])
