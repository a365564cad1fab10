// Python module init of mlan_kernels._C. Loading the library runs the TORCH_LIBRARY
// registrations of the mlan_C ops (torch.ops.mlan_C.mm_adapter_forward / _backward); the
// module itself only reports how the extension was built.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "mlan_kernels compiled MM-Adapter kernels (ops in torch.ops.mlan_C)";
#ifdef MLAN_WITH_CUDA
  module.attr("cuda_compiled") = true;
#else
  module.attr("cuda_compiled") = false;
#endif
  module.def("parallel_info", &at::get_parallel_info,
             "ATen's threading backend and thread counts, as the CPU kernels see them");
}
