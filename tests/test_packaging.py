"""What a user installs: the sdist holds every file the build needs, and a CPU-only install works
without triton. (`make sdist-check` builds and imports the sdist from outside the tree.)"""
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_files(*paths):
    """Files git tracks under `paths` (relative to the repository root)."""
    listed = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert listed, f"git ls-files {paths} found nothing (not a git checkout?)"
    return listed


def test_sdist_holds_every_compiled_source_header_and_build_file(tmp_path):
    built = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; "
         "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    sdist = tmp_path / built.stdout.split()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = git_files("csrc", "docs", "cmake", "python", "tests", "benchmarks") + [
        "CMakeLists.txt", "setup.py", "pyproject.toml", "LICENSE", "README.md", "MANIFEST.in", "Makefile",
        "constraints.txt", "constraints-oldest.txt"]
    missing = sorted(set(needed) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not [name for name in names if name.endswith((".so", ".o"))]
    assert "mlan_kernels/integrations/hf_compat.py" in names


CPU_ONLY = r"""
import importlib.abc, sys, warnings

class NoTriton(importlib.abc.MetaPathFinder):
    '''An environment where triton is not installed: importing it fails.'''
    attempts = []
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoTriton())
warnings.simplefilter("error")                      # no fallback warning either
import torch
import mlan_kernels as mk
from mlan_kernels.integrations.tiny import tiny_llama

adapter = mk.MMAdapter(32, rank=8, dropout_p=0.0)
torch.nn.init.normal_(adapter.up.weight)
x = torch.randn(2, 5, 32, requires_grad=True)
y = adapter(x)
y.sum().backward()
reference = adapter(x, backend="reference")
torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
p, q = torch.randn(4, 50), torch.randn(4, 50)
kl = mk.kl_div_logits(p, q)
model = mk.patch_llama(tiny_llama())
model(torch.tensor([[3, 4, 5]]))
grads = [torch.randn(3, 3) for _ in range(2)]
params = [torch.nn.Parameter(torch.zeros(3, 3)) for _ in range(2)]
for param, grad in zip(params, grads):
    param.grad = grad
mk.scale_grads_([params], [0.5])
print("attempts", NoTriton.attempts)
"""


def test_a_cpu_only_install_never_needs_triton():
    """mlan_kernels, the adapter op (auto backend), KL, grad scaling and patching run on CPU
    with triton absent, without a warning."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.pop("MLAN_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", CPU_ONLY], capture_output=True, text=True,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "attempts" in result.stdout


def test_triton_is_an_extra_not_a_dependency():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    assert not [d for d in project["dependencies"] if d.startswith("triton")]
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["triton"])


def test_the_source_list_names_every_compiled_source_once():
    """csrc/sources.txt is what setup.py, CMakeLists.txt and `make cuda-check` build: every
    .cpp/.cu under csrc/ is listed exactly once under a known part, and nothing else is."""
    with open(os.path.join(ROOT, "csrc", "sources.txt"), encoding="utf-8") as handle:
        lines = [line.split() for line in handle if line.strip() and not line.startswith("#")]
    assert all(len(line) == 2 and line[0] in ("core", "python", "cuda", "test") for line in lines), lines
    listed = [path for _, path in lines]
    assert len(listed) == len(set(listed))
    compiled = [path for path in git_files("csrc") if path.endswith((".cpp", ".cu"))]
    assert sorted(listed) == sorted(compiled)
