// ATen glue of the CUDA kernels: binds mm_adapter_kernels.cu's launchers to the current CUDA
// stream and registers them for the CUDA dispatch key of the mlan_C ops. Validation and tensor
// preparation are shared with the CPU path (mm_adapter_api.cpp); the generic entry points set
// the device guard to x's device before launching.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "mm_adapter_api.h"

namespace mlan {
namespace {

void forward_on_current_stream(const ForwardArgs& args) {
  forward_cuda(args, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward_on_current_stream(const BackwardArgs& args) {
  backward_cuda(args, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr KernelSet kCudaKernels{c10::DeviceType::CUDA, /*supports_float64=*/false,
                                 &backward_workspace_bytes_cuda, &forward_on_current_stream,
                                 &backward_on_current_stream};

}  // namespace
}  // namespace mlan

TORCH_LIBRARY_IMPL(mlan_C, CUDA, library) {
  mlan::register_mm_adapter_impls<&mlan::kCudaKernels>(library);
}
