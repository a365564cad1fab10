"""Build script for mlan-kernels: the metadata lives in pyproject.toml; this file only decides
whether to compile the C++/CUDA extension in csrc/.

Install torch first, then this package without build isolation, so the extension is built
against the torch you will run it with:

    pip install torch==2.13.0
    pip install --no-build-isolation .

What gets built (one extension, `mlan_kernels._C`), from the source list csrc/sources.txt
(which CMakeLists.txt and the Makefile's cuda-check read too):
    "core" and "python" sources   always (-O3, OpenMP, torch's C++ std) -> the `cpu` backend
    "cuda" sources                when the installed torch is a CUDA build and nvcc is found
                                  (CUDA_HOME / PATH)                   -> the `cuda` backend

Environment switches:
    MLAN_SKIP_EXT=1          build a pure-Python package even when csrc/ has sources (the
                             dispatcher then falls back to the reference backend, warning once)
    MLAN_SKIP_CUDA=1         build only the CPU kernels even when CUDA is available
    TORCH_CUDA_ARCH_LIST     GPU architectures to compile for (default here: "8.0;9.0")
    MAX_JOBS=N               parallel compile jobs (read by torch's BuildExtension; default here: CPUs)
    MLAN_DEBUG=1             keep debug symbols (-g, and -lineinfo for nvcc); release builds
                             strip them (-g0: Python's own CFLAGS carry -g, which made _C ~10 MB)
"""
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "mlan_kernels._C"

TORCH_MISSING = """
mlan-kernels compiles its extension against the torch you already have, and no torch was found
in this build environment ({python}).
Install torch first, then build without isolation (pip's isolated build env has no torch):

    pip install torch==2.13.0
    pip install --no-build-isolation .

or set MLAN_SKIP_EXT=1 for a pure-Python install.
"""


SOURCE_LIST = os.path.join("csrc", "sources.txt")


def _sources(*parts):
    """Paths (relative to ROOT) of the csrc/sources.txt lines of the given parts, in order;
    [] when there is no list (a pure-Python tree)."""
    path = os.path.join(ROOT, SOURCE_LIST)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        lines = [line.split() for line in handle if line.strip() and not line.startswith("#")]
    return [source for part, source in lines if part in parts]


def _import_torch():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(TORCH_MISSING.format(python=sys.executable))
    return torch, cpp_extension


def _cuda_available(torch, cpp_extension):
    """Whether to compile the CUDA kernels: a CUDA build of torch, nvcc, and no MLAN_SKIP_CUDA."""
    if os.environ.get("MLAN_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def get_extensions():
    """The compiled extension `mlan_kernels._C`, or [] for a pure-Python build.

    Builds the "core" and "python" sources of csrc/sources.txt (OpenMP) into one extension,
    adding the "cuda" ones when the installed torch is a CUDA build and a CUDA toolkit is
    found. Returns [] when MLAN_SKIP_EXT=1 or there are no C++ sources; torch is imported only
    when something is to be compiled.
    """
    if os.environ.get("MLAN_SKIP_EXT", "0") == "1":
        return []
    cpp_sources = _sources("core", "python")
    if not cpp_sources:
        return []
    torch, cpp_extension = _import_torch()
    cuda_sources = _sources("cuda")
    with_cuda = bool(cuda_sources) and _cuda_available(torch, cpp_extension)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    debug = os.environ.get("MLAN_DEBUG", "0") == "1"
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


extensions = get_extensions()
setup(ext_modules=extensions, cmdclass=_build_command_class() if extensions else {})
