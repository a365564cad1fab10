"""Old import paths of modules that moved to their layer, kept for one release.

A module left at its old path is two lines, `alias_moved_module(__name__, "<new path>")`: the
first import warns once (DeprecationWarning) and makes the old name the new module itself, so
every name, private ones and monkeypatching included, behaves as before. `python -m <old path>`
runs the new module.
"""
import importlib
import runpy
import sys
import warnings


def alias_moved_module(old: str, new: str) -> None:
    """Make module `old` (the caller's __name__) an alias of module `new`, warning once."""
    if old == "__main__":
        warnings.warn(f"run `python -m {new}`; the old module path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        runpy.run_module(new, run_name="__main__", alter_sys=True)
        return
    warnings.warn(f"{old} moved to {new}; import it from there ({old} goes away in the next release)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
