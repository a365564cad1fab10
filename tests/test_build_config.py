"""setup.py's choice of CUDA toolkit, checked on fake toolkit folders: a toolkit counts only with
include/cuda_runtime.h and an nvcc of torch's CUDA major version; an nvcc wrapper or symlink on
PATH is followed to its real folder; otherwise the build is CPU-only with one warning naming
CUDA_HOME and MLAN_SKIP_CUDA, or fails under MLAN_REQUIRE_CUDA=1. Metadata and sdist builds run
without torch."""
import importlib.util
import os
import stat
import subprocess
import sys
import tarfile
import types
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_setup():
    """setup.py as a module (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("mlan_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_setup()

# What a real nvcc prints: its release for --version, its own folder (_HERE_) for --dryrun.
FAKE_NVCC = """#!/bin/sh
here="$(dirname "$(readlink -f "$0")")"
case "$1" in
  --version) echo "Cuda compilation tools, release {release}, V{release}.88" ;;
  --dryrun) echo "#\\$ _HERE_=$here" >&2 ;;
esac
"""


def executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_toolkit(folder, release="13.0", header="include"):
    """A toolkit folder: bin/nvcc answering like CUDA `release`, cuda_runtime.h under `header`
    (None: no header)."""
    executable(folder / "bin" / "nvcc", FAKE_NVCC.format(release=release))
    if header:
        (folder / header).mkdir(parents=True)
        (folder / header / "cuda_runtime.h").write_text("/* fake */\n")
    return folder


@pytest.fixture(autouse=True)
def no_default_toolkit(monkeypatch, tmp_path):
    """/usr/local/cuda of the machine running the tests plays no part."""
    monkeypatch.setattr(build, "DEFAULT_TOOLKIT", str(tmp_path / "no-default-cuda"))


def no_nvcc(_name):
    return None


def test_nvcc_major_reads_the_release_line():
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n"
    assert build.nvcc_major(text) == 12
    assert build.nvcc_major("command not found") is None


def test_the_runtime_header_is_found_in_both_toolkit_layouts(tmp_path):
    assert build.runtime_header(str(fake_toolkit(tmp_path / "a"))) == str(tmp_path / "a/include/cuda_runtime.h")
    conda = fake_toolkit(tmp_path / "b", header="targets/x86_64-linux/include")
    assert build.runtime_header(str(conda)) == str(conda / "targets/x86_64-linux/include/cuda_runtime.h")
    assert build.runtime_header(str(fake_toolkit(tmp_path / "c", header=None))) is None


@pytest.mark.parametrize("argv, compiles", [(["egg_info"], False), (["sdist"], False),
                                            (["dist_info", "--output-dir", "x"], False),
                                            (["bdist_wheel", "--dist-dir", "x"], True),
                                            (["build_ext", "--inplace"], True), (["editable_wheel"], True)])
def test_only_compiling_commands_need_torch(argv, compiles):
    assert build.compiles(argv) is compiles


def test_a_cpu_torch_builds_cpu_only_without_a_word(tmp_path):
    good = str(fake_toolkit(tmp_path / "cuda"))
    assert build.choose_toolkit({"CUDA_HOME": good}, None, None, no_nvcc) == (None, None)


def test_skip_cuda_wins_over_a_usable_toolkit(tmp_path):
    good = str(fake_toolkit(tmp_path / "cuda"))
    assert build.choose_toolkit({"CUDA_HOME": good, "MLAN_SKIP_CUDA": "1"}, "13.0", good, no_nvcc) == (None, None)


def test_a_usable_cuda_home_is_taken(tmp_path):
    good = str(fake_toolkit(tmp_path / "cuda"))
    assert build.choose_toolkit({"CUDA_HOME": good}, "13.0", good, no_nvcc) == (good, None)


def test_a_cuda_home_without_headers_is_refused_and_the_message_says_what_to_set(tmp_path):
    """The layout that broke the build: torch's guess (the nvcc wrapper's grandparent) has no
    headers; CUDA_HOME set by the user is the only folder tried."""
    bare = str(fake_toolkit(tmp_path / "usr-local", header=None))
    toolkit, message = build.choose_toolkit({"CUDA_HOME": bare}, "13.0", bare, no_nvcc)
    assert toolkit is None
    assert f"{bare}: no include/cuda_runtime.h" in message
    assert "CUDA_HOME" in message and "MLAN_SKIP_CUDA=1" in message


def test_an_nvcc_of_another_major_version_is_refused(tmp_path):
    old = str(fake_toolkit(tmp_path / "cuda-12", release="12.8"))
    toolkit, message = build.choose_toolkit({"CUDA_HOME": old}, "13.0", old, no_nvcc)
    assert toolkit is None and "nvcc is CUDA 12, torch needs CUDA 13" in message


def test_a_wrapper_script_on_path_leads_to_the_real_toolkit(tmp_path):
    """nvcc on PATH is `exec <toolkit>/bin/nvcc "$@"` in a folder without headers; torch guesses
    that folder's parent. The real nvcc names its folder, and that toolkit is taken."""
    real = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = executable(tmp_path / "usr-local" / "bin" / "nvcc", f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    guess = str(tmp_path / "usr-local")
    assert build.toolkit_behind(str(wrapper)) == str(real)
    assert build.choose_toolkit({}, "13.0", guess, lambda name: str(wrapper)) == (str(real), None)


def test_a_symlink_on_path_leads_to_the_real_toolkit(tmp_path):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    os.symlink(real / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    assert build.toolkit_behind(str(tmp_path / "bin" / "nvcc")) == str(real)


def test_candidates_are_tried_in_order_without_repeats(tmp_path, monkeypatch):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    monkeypatch.setattr(build, "DEFAULT_TOOLKIT", str(real))
    nvcc = str(real / "bin" / "nvcc")
    assert build.toolkit_candidates({}, "/opt/guess", lambda name: nvcc) == ["/opt/guess", str(real)]
    assert build.toolkit_candidates({"CUDA_PATH": "/opt/mine"}, "/opt/guess", lambda name: nvcc) == ["/opt/mine"]


def test_nothing_found_lists_every_folder_tried(tmp_path):
    guess = str(fake_toolkit(tmp_path / "guess", header=None))
    toolkit, message = build.choose_toolkit({}, "13.0", guess, no_nvcc)
    assert toolkit is None
    assert f"{guess}: no include/cuda_runtime.h" in message
    assert f"{tmp_path / 'no-default-cuda'}: no such folder" in message


def fake_torch(cuda, cuda_home):
    cpp_extension = types.SimpleNamespace(CUDA_HOME=cuda_home)
    return types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda)), cpp_extension


def test_the_build_warns_once_and_goes_cpu_only(tmp_path, monkeypatch):
    bare = str(fake_toolkit(tmp_path / "usr-local", header=None))
    monkeypatch.setenv("CUDA_HOME", bare)
    monkeypatch.delenv("MLAN_REQUIRE_CUDA", raising=False)
    monkeypatch.delenv("MLAN_SKIP_CUDA", raising=False)
    torch, cpp_extension = fake_torch("13.0", bare)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build._cuda_toolkit(torch, cpp_extension) is None
    assert len(caught) == 1
    assert "CUDA_HOME" in str(caught[0].message) and "MLAN_SKIP_CUDA" in str(caught[0].message)
    assert cpp_extension.CUDA_HOME == bare


def test_require_cuda_turns_the_warning_into_a_failure(tmp_path, monkeypatch):
    bare = str(fake_toolkit(tmp_path / "usr-local", header=None))
    monkeypatch.setenv("CUDA_HOME", bare)
    monkeypatch.setenv("MLAN_REQUIRE_CUDA", "1")
    with pytest.raises(SystemExit, match="CUDA_HOME.*MLAN_SKIP_CUDA"):
        build._cuda_toolkit(*fake_torch("13.0", bare))
    with pytest.raises(SystemExit, match="CPU build"):
        build._cuda_toolkit(*fake_torch(None, None))


def test_a_found_toolkit_becomes_torchs_cuda_home(tmp_path, monkeypatch):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = executable(tmp_path / "usr-local" / "bin" / "nvcc", f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    torch, cpp_extension = fake_torch("13.0", str(tmp_path / "usr-local"))
    assert build._cuda_toolkit(torch, cpp_extension) == str(real)
    assert cpp_extension.CUDA_HOME == os.environ["CUDA_HOME"] == str(real)


# torch absent: None in sys.modules makes `import torch` fail and find_spec("torch") find
# nothing, as when it is not installed (setuptools plugins probe with find_spec).
WITHOUT_TORCH = r"""
import sys
sys.modules["torch"] = None
from setuptools import build_meta
sdist_folder, wheel_folder = sys.argv[1:3]           # build_meta rewrites sys.argv
print(build_meta.get_requires_for_build_sdist())
print(build_meta.get_requires_for_build_wheel())
print(build_meta.build_sdist(sdist_folder))
try:
    build_meta.build_wheel(wheel_folder)
except SystemExit as stop:
    print("wheel:", stop)
"""


def test_metadata_and_sdist_build_without_torch_and_a_wheel_says_to_install_it(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "MLAN_SKIP_EXT"}
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(tmp_path), str(wheels)], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sdist = [line for line in result.stdout.splitlines() if line.endswith(".tar.gz")]
    assert sdist, result.stdout
    with tarfile.open(tmp_path / sdist[0]) as archive:
        assert any(name.endswith("/setup.py") for name in archive.getnames())
    assert "wheel: \nmlan-kernels compiles its extension against the torch you already have" in result.stdout
