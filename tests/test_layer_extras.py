"""Each layer's dependencies: the kernel core runs with torch alone, a layer above it says which
extra to install, and the modules that moved to their layer keep their old import paths for one
release (a DeprecationWarning, once)."""
import os
import subprocess
import sys

import pytest

from mlan_kernels.requirements import EXTRA_MODULES, require_extra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An environment where only torch (and the standard library) is installed: every module an
# extra provides is absent (None in sys.modules: importing it raises ModuleNotFoundError and
# importlib.util.find_spec finds nothing, as for a package that is not installed).
TORCH_ONLY = r"""
import sys
BLOCKED = ("transformers", "safetensors", "tokenizers", "accelerate", "PIL", "numpy", "tqdm",
           "peft", "matplotlib")
sys.modules.update(dict.fromkeys(BLOCKED))
"""

CORE_RUNS = TORCH_ONLY + r"""
import torch
import mlan_kernels as mk
adapter = mk.MMAdapter(16, rank=4, dropout_p=0.0)
torch.nn.init.normal_(adapter.up.weight)
x = torch.randn(2, 3, 16, requires_grad=True)
adapter(x).square().sum().backward()
assert x.grad is not None and adapter.up.weight.grad.abs().sum() > 0
w = torch.randn(2, 16, 2)
y = mk.mm_adapter(x, torch.randn(4, 16), torch.zeros(4), w, torch.zeros(2, 16),
                  torch.randn(2, 16), torch.zeros(2), groups=2)
y.sum().backward()
mk.kl_div_logits(torch.randn(3, 5), torch.randn(3, 5))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
assert not loaded, loaded
for layer in ("mlan_kernels.integrations", "mlan_kernels.training", "mlan_kernels.data", "mlan_train"):
    try:
        __import__(layer)
    except ImportError as error:
        print(layer, "->", error)
try:
    mk.patch_llama
except ImportError as error:
    print("mk.patch_llama ->", error)
namespace = {}
exec("from mlan_kernels import *", namespace)
assert {"MMAdapter", "mm_adapter", "AdapterConfig"} <= set(namespace) and "patch" not in namespace
"""


def test_the_core_runs_with_torch_alone_and_each_layer_names_its_extra():
    result = subprocess.run([sys.executable, "-c", CORE_RUNS], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    hf = ("needs the 'hf' extra (missing: transformers, safetensors): pip install 'mlan-kernels[hf]'")
    train = ("needs the 'train' extra (missing: transformers, safetensors, PIL, numpy, tokenizers, tqdm): "
             "pip install 'mlan-kernels[train]'")
    assert lines == [f"mlan_kernels.integrations -> mlan_kernels.integrations {hf}",
                     f"mlan_kernels.training -> mlan_kernels.training {train}",
                     f"mlan_kernels.data -> mlan_kernels.data {train}",
                     f"mlan_train -> mlan_train {train}",
                     f"mk.patch_llama -> mlan_kernels.integrations {hf}"]


def test_require_extra_names_only_what_is_missing(monkeypatch):
    import mlan_kernels.requirements as requirements
    monkeypatch.setattr(requirements, "_installed", lambda module: module != "PIL")
    with pytest.raises(ImportError, match=r"^x needs the 'train' extra \(missing: PIL\): "
                                          r"pip install 'mlan-kernels\[train\]'$") as caught:
        require_extra("train", "x")
    assert caught.value.name == "PIL"
    require_extra("hf", "x")                         # all there: no error
    with pytest.raises(ValueError, match="extra: expected one of"):
        require_extra("bench", "x")


def test_star_import_takes_every_name_where_the_extras_are_installed():
    import mlan_kernels
    namespace = {}
    exec("from mlan_kernels import *", namespace)
    assert {"MMAdapter", "patch", "build_lavin", "save_adapters", "summary", "training"} <= set(namespace)
    assert namespace["save_adapters"] is mlan_kernels.integrations.checkpoint.save_adapters


def test_the_extras_of_pyproject_provide_what_the_layers_ask_for():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    extras = project["optional-dependencies"]
    assert project["dependencies"] == ["torch>=2.11"]
    import_names = {"pillow": "PIL"}

    def provided(extra):
        names = set()
        for requirement in extras[extra]:
            name = requirement.split(">")[0].split("=")[0].split(";")[0].split("[")[0].strip()
            if name == "mlan-kernels":
                names |= set().union(*(provided(e) for e in requirement.split("[")[1].rstrip("]").split(",")))
            else:
                names.add(import_names.get(name, name))
        return names
    for extra, modules in EXTRA_MODULES.items():
        assert set(modules) <= provided(extra), (extra, set(modules) - provided(extra))
    assert "flash" not in extras["all"][0] and {"hf", "train", "bench", "test", "peft", "triton"} <= \
        set(extras["all"][0].split("[")[1].rstrip("]").split(","))


MOVED = {"checkpoint": "integrations", "checkpoint_validation": "integrations", "lavin_format": "integrations",
         "convert": "integrations", "summary": "integrations", "plot": "training"}

ALIASES = r"""
import importlib, sys, warnings
moved = %r
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for old, layer in moved.items():
        first = importlib.import_module(f"mlan_kernels.{old}")
        again = importlib.import_module(f"mlan_kernels.{old}")
        new = importlib.import_module(f"mlan_kernels.{layer}.{old}")
        assert first is again is new, old
    from mlan_kernels.checkpoint import load_adapters
    from mlan_kernels.integrations.checkpoint import load_adapters as moved_load
    assert load_adapters is moved_load
for warning in caught:
    print(warning.category.__name__, warning.message)
""" % (MOVED,)


def test_the_old_paths_of_moved_modules_warn_once_and_are_the_new_modules():
    result = subprocess.run([sys.executable, "-c", ALIASES], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"DeprecationWarning mlan_kernels.{old} moved to mlan_kernels.{layer}.{old}; import it from there "
        f"(mlan_kernels.{old} goes away in the next release)" for old, layer in MOVED.items()]


def test_python_dash_m_on_an_old_path_runs_the_moved_module():
    result = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "mlan_kernels.plot",
                             "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: python -m mlan_kernels.training.plot")
    assert "run `python -m mlan_kernels.training.plot`" in result.stderr
