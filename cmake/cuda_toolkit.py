"""For CMakeLists.txt: the CUDA toolkit to configure a CUDA build of torch with, found the way
setup.py finds it (choose_toolkit), and the nvrtc library of torch's CUDA wheels when the
toolkit has none. Prints key=value lines: torch_cuda, toolkit, nvrtc, message (each may be
empty). Run with the Python whose torch CMake builds against."""
import glob
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    spec = importlib.util.spec_from_file_location("mlan_setup", os.path.join(ROOT, "setup.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    import torch
    from torch.utils import cpp_extension
    environ = {key: value for key, value in os.environ.items() if key != "MLAN_SKIP_CUDA"}
    toolkit, message = build.choose_toolkit(environ, torch.version.cuda, cpp_extension.CUDA_HOME)
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = []
    if toolkit and not glob.glob(os.path.join(glob.escape(toolkit), "lib*", "libnvrtc.so*")):
        nvrtc = sorted(glob.glob(os.path.join(glob.escape(site), "nvidia", "*", "lib", "libnvrtc.so*")))
    print(f"torch_cuda={torch.version.cuda or ''}")
    print(f"toolkit={toolkit or ''}")
    print(f"nvrtc={nvrtc[0] if nvrtc else ''}")
    print(f"message={message or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
