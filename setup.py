"""Build script for mlan-kernels: the metadata lives in pyproject.toml; this file only decides
whether to compile the C++/CUDA extension in csrc/, and says why when it leaves CUDA out.

Install torch first, then this package without build isolation, so the extension is built
against the torch you will run it with:

    pip install torch==2.13.0
    pip install --no-build-isolation .

What gets built (one extension, `mlan_kernels._C`), from the source list csrc/sources.txt
(which CMakeLists.txt and the Makefile's cuda-check read too):
    "core" and "python" sources   always (-O3, OpenMP, torch's C++ std) -> the `cpu` backend
    "cuda" sources                when the installed torch is a CUDA build and a CUDA toolkit
                                  with include/cuda_runtime.h and an nvcc of torch's CUDA major
                                  version is found                    -> the `cuda` backend

Where the toolkit is looked for, first usable one wins: $CUDA_HOME (or $CUDA_PATH) alone when
set; otherwise torch's guess, the toolkit behind the `nvcc` on PATH (a symlink or a wrapper
script is followed to the real nvcc), then /usr/local/cuda. When torch is a CUDA build and no
usable toolkit is found the CPU kernels are built and one warning names CUDA_HOME and
MLAN_SKIP_CUDA; a CPU build of torch always gives a CPU build, silently.

Environment switches:
    MLAN_SKIP_EXT=1          build a pure-Python package even when csrc/ has sources (the
                             dispatcher then falls back to the plain-torch backend, warning once)
    MLAN_SKIP_CUDA=1         build only the CPU kernels even when CUDA is available
    MLAN_REQUIRE_CUDA=1      fail (instead of warning and building CPU-only) when the CUDA
                             kernels cannot be built
    CUDA_HOME=/path          the CUDA toolkit to build with
    TORCH_CUDA_ARCH_LIST     GPU architectures to compile for (default here: "8.0;9.0")
    MAX_JOBS=N               parallel compile jobs (read by torch's BuildExtension; default here: CPUs)
    MLAN_DEBUG=1             keep debug symbols (-g, and -lineinfo for nvcc); release builds
                             strip them (-g0: Python's own CFLAGS carry -g, which made _C ~10 MB)

torch is imported only by the commands that compile (build, build_ext, bdist_wheel, develop,
install, editable_wheel): metadata and sdist builds work without torch.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "mlan_kernels._C"
SOURCE_LIST = os.path.join("csrc", "sources.txt")
DEFAULT_TOOLKIT = "/usr/local/cuda"
COMPILING_COMMANDS = ("build", "build_ext", "bdist_wheel", "bdist_egg", "develop", "install",
                      "editable_wheel")

TORCH_MISSING = """
mlan-kernels compiles its extension against the torch you already have, and no torch was found
in this build environment ({python}).
Install torch first, then build without isolation (pip's isolated build env has no torch):

    pip install torch==2.13.0
    pip install --no-build-isolation .

or set MLAN_SKIP_EXT=1 for a pure-Python install.
"""

NO_TOOLKIT = (
    "the installed torch is a CUDA {torch_cuda} build, but no CUDA toolkit to compile the CUDA kernels with was "
    "found ({tried}). Set CUDA_HOME to the toolkit folder (the one holding bin/nvcc and "
    "include/cuda_runtime.h, CUDA {major}.x) to build them, or MLAN_SKIP_CUDA=1 to build the CPU "
    "kernels only.")


def _sources(*parts):
    """Paths (relative to ROOT) of the csrc/sources.txt lines of the given parts, in order;
    [] when there is no list (a pure-Python tree)."""
    path = os.path.join(ROOT, SOURCE_LIST)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        lines = [line.split() for line in handle if line.strip() and not line.startswith("#")]
    return [source for part, source in lines if part in parts]


def _flag(environ, name):
    return environ.get(name, "0") == "1"


def compiles(argv):
    """Whether the setup.py command line `argv` (without the script) compiles anything; sdist,
    egg_info and dist_info only read metadata and must work without torch."""
    return any(arg in COMPILING_COMMANDS for arg in argv)


def nvcc_major(version_text):
    """The major version in `nvcc --version` output ("... release 13.0, V13.0.88" -> 13), or None."""
    match = re.search(r"release (\d+)\.\d+", version_text)
    return int(match.group(1)) if match else None


def runtime_header(toolkit):
    """The toolkit's cuda_runtime.h (include/ or a targets/<arch>/include/ layout), or None."""
    for pattern in ("include", os.path.join("targets", "*", "include")):
        for folder in sorted(glob.glob(os.path.join(glob.escape(toolkit), pattern))):
            if os.path.isfile(os.path.join(folder, "cuda_runtime.h")):
                return os.path.join(folder, "cuda_runtime.h")
    return None


def _run(command):
    """stdout + stderr of `command`, "" when it cannot run (missing, not executable, hangs)."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout + result.stderr


def toolkit_behind(nvcc):
    """The toolkit folder of the nvcc executable `nvcc` (a path), following symlinks and asking a
    wrapper script's real nvcc where it lives (`nvcc --dryrun` prints its folder as _HERE_)."""
    real = os.path.realpath(nvcc)
    if os.path.basename(os.path.dirname(real)) == "bin" and runtime_header(os.path.dirname(os.path.dirname(real))):
        return os.path.dirname(os.path.dirname(real))
    here = re.search(r"^#\$ _HERE_=(.+)$", _run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull,
                                                  "-o", os.devnull]), re.MULTILINE)
    if here:
        return os.path.dirname(os.path.realpath(here.group(1).strip()))
    return os.path.dirname(os.path.dirname(real))


def toolkit_candidates(environ, torch_guess, which=shutil.which):
    """Folders to try, in order, without repeats: CUDA_HOME (or CUDA_PATH) alone when set (the
    user said where); else torch's guess, the toolkit behind `nvcc` on PATH, /usr/local/cuda."""
    explicit = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if explicit:
        return [explicit]
    nvcc = which("nvcc")
    found = [torch_guess, toolkit_behind(nvcc) if nvcc else None, DEFAULT_TOOLKIT]
    candidates = []
    for folder in found:
        if folder and os.path.realpath(folder) not in map(os.path.realpath, candidates):
            candidates.append(folder)
    return candidates


def toolkit_problem(toolkit, torch_cuda):
    """Why `toolkit` cannot build against torch's CUDA version `torch_cuda` ("13.0"), or None."""
    if not os.path.isdir(toolkit):
        return f"{toolkit}: no such folder"
    if runtime_header(toolkit) is None:
        return f"{toolkit}: no include/cuda_runtime.h"
    nvcc = os.path.join(toolkit, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return f"{toolkit}: no bin/nvcc"
    major, wanted = nvcc_major(_run([nvcc, "--version"])), int(torch_cuda.split(".")[0])
    if major is None:
        return f"{toolkit}: bin/nvcc --version names no release"
    if major != wanted:
        return f"{toolkit}: nvcc is CUDA {major}, torch needs CUDA {wanted}"
    return None


def choose_toolkit(environ, torch_cuda, torch_guess, which=shutil.which):
    """(toolkit folder or None, message or None) for building the CUDA kernels.

    None, None: no CUDA wanted (MLAN_SKIP_CUDA=1, or a CPU build of torch: `torch_cuda` None).
    folder, None: build with that toolkit. None, message: CUDA wanted but not buildable; the
    message names what was tried, CUDA_HOME and MLAN_SKIP_CUDA (the caller warns or fails)."""
    if _flag(environ, "MLAN_SKIP_CUDA"):
        return None, None
    if torch_cuda is None:
        if _flag(environ, "MLAN_REQUIRE_CUDA"):
            return None, "MLAN_REQUIRE_CUDA=1, but the installed torch is a CPU build (torch.version.cuda is None)"
        return None, None
    problems = []
    for toolkit in toolkit_candidates(environ, torch_guess, which):
        problem = toolkit_problem(toolkit, torch_cuda)
        if problem is None:
            return toolkit, None
        problems.append(problem)
    tried = "; ".join(problems) or "no CUDA_HOME, no nvcc on PATH"
    return None, NO_TOOLKIT.format(torch_cuda=torch_cuda, tried=tried, major=torch_cuda.split(".")[0])


def _import_torch():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(TORCH_MISSING.format(python=sys.executable))
    return torch, cpp_extension


def _cuda_toolkit(torch, cpp_extension):
    """The toolkit folder to build the CUDA kernels with, or None for a CPU-only build (after
    one warning when torch is a CUDA build; exits instead under MLAN_REQUIRE_CUDA=1)."""
    toolkit, message = choose_toolkit(os.environ, torch.version.cuda, cpp_extension.CUDA_HOME)
    if message and _flag(os.environ, "MLAN_REQUIRE_CUDA"):
        sys.exit(f"error: mlan-kernels: {message}")
    if message:
        warnings.warn(f"mlan-kernels builds its CPU kernels only: {message}", stacklevel=2)
    if toolkit:       # torch's build reads its module-level guess; make it the folder we checked
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = toolkit
    return toolkit


def get_extensions():
    """The compiled extension `mlan_kernels._C`, or [] for a pure-Python build.

    Builds the "core" and "python" sources of csrc/sources.txt (OpenMP) into one extension,
    adding the "cuda" ones when the installed torch is a CUDA build and a usable CUDA toolkit is
    found (`choose_toolkit`). Returns [] when MLAN_SKIP_EXT=1 or there are no C++ sources.
    """
    if _flag(os.environ, "MLAN_SKIP_EXT"):
        return []
    cpp_sources = _sources("core", "python")
    if not cpp_sources:
        return []
    torch, cpp_extension = _import_torch()
    cuda_sources = _sources("cuda")
    with_cuda = bool(cuda_sources) and _cuda_toolkit(torch, cpp_extension) is not None
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    debug = _flag(os.environ, "MLAN_DEBUG")
    symbols = ["-g"] if debug else ["-g0"]        # last flag wins over Python's CFLAGS -g
    extra_compile_args = {"cxx": ["-O3", *symbols, *openmp]}  # C++ standard: torch's default
    define_macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra_compile_args["nvcc"] = ["-O3", *(["-lineinfo"] if debug else [])]
        define_macros.append(("MLAN_WITH_CUDA", "1"))
        extension = cpp_extension.CUDAExtension
    else:
        cuda_sources = []
        extension = cpp_extension.CppExtension
    return [extension(name=EXTENSION_NAME, sources=cpp_sources + cuda_sources,
                      include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define_macros,
                      extra_compile_args=extra_compile_args,
                      extra_link_args=openmp + ([] if debug else ["-s"]))]


def _build_command_class():
    """torch's BuildExtension (ninja, honours MAX_JOBS); MAX_JOBS defaults to the CPU count."""
    _, cpp_extension = _import_torch()
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return {"build_ext": cpp_extension.BuildExtension}


if __name__ == "__main__":     # setuptools runs this file as __main__; tests import it
    extensions = get_extensions() if compiles(sys.argv[1:]) else []
    setup(ext_modules=extensions, cmdclass=_build_command_class() if extensions else {})
