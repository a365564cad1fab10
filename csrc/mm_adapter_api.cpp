// The C++ API of the compiled MM-Adapter: schemas of the low-level ops (namespace mlan_C, kept
// apart from the user-facing Python op mlan::mm_adapter), validation of every argument with
// TORCH_CHECK messages that name it, tensor preparation, the launch on x's device, and the
// registration of the two functions for every device this build has kernels for.
//
//   mlan_C::mm_adapter_forward(x, down_weight, down_bias, up_weight, up_bias, routing_weights,
//                              scale, dropout_p, seed, groups, single_modality) -> (y, hidden)
//   mlan_C::mm_adapter_backward(grad_y, x, hidden, routing_weights, down_weight, down_bias,
//                               up_weight, up_bias, scale, dropout_p, seed, groups)
//       -> (grad_x, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias,
//           grad_routing_weights)
// x, grad_y: [B, L, D] with channel stride 1 (batch and token strides are free);
// down_weight [r, D]; down_bias [r]; up_weight [E, D, r/groups]; up_bias [E, D];
// routing_weights [B, E]; hidden [B, L, r]. Parameters may have any floating dtype (they are
// converted to the accumulation dtype: float64 for float64 x, else float32).
// seed: a 1-element int64 tensor on x's device when dropout_p > 0 (ignored, may be None,
// without dropout). Its value is never read here: the kernels get a pointer to it and read it
// themselves (in device memory on CUDA), so a CUDA seed costs no host sync.
#include "mm_adapter_api.h"

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#ifdef MLAN_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "mm_adapter.h"

namespace mlan {
namespace {

// ---- the kernels of each device (CPU: csrc/cpu, all four dtypes; CUDA: csrc/cuda, launched
// on torch's current stream, no float64).
#ifdef MLAN_WITH_CUDA
constexpr const char* kKernelDevices = "a CPU or CUDA";
#else
constexpr const char* kKernelDevices = "a CPU";
#endif

bool has_kernels(c10::DeviceType device) {
#ifdef MLAN_WITH_CUDA
  if (device == c10::DeviceType::CUDA) return true;
#endif
  return device == c10::DeviceType::CPU;
}

bool supports_float64(c10::DeviceType device) { return device == c10::DeviceType::CPU; }

int64_t workspace_bytes(c10::DeviceType device, const AdapterShape& shape, ScalarType dtype) {
#ifdef MLAN_WITH_CUDA
  if (device == c10::DeviceType::CUDA) return backward_workspace_bytes_cuda(shape, dtype);
#endif
  return backward_workspace_bytes_cpu(shape, dtype);
}

template <typename Args>
void run_kernels(c10::DeviceType device, const Args& args) {
  constexpr bool is_forward = std::is_same_v<Args, ForwardArgs>;
#ifdef MLAN_WITH_CUDA
  if (device == c10::DeviceType::CUDA) {
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    if constexpr (is_forward) forward_cuda(args, stream); else backward_cuda(args, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  if constexpr (is_forward) forward_cpu(args); else backward_cpu(args);
}

constexpr const char* kForwardOp = "mlan_C::mm_adapter_forward";
constexpr const char* kBackwardOp = "mlan_C::mm_adapter_backward";

void check_rank(const char* op, const char* name, const at::Tensor& tensor, int64_t dims,
                const char* pattern) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(tensor.dim() == dims, op, ": ", name, " must be ", dims, "-D ", pattern,
              ", got shape ", tensor.sizes());
}

// `tensor` has shape `expected` (spelled `pattern`), is floating point and on x's device.
void check_tensor(const char* op, const char* name, const at::Tensor& tensor,
                  const std::vector<int64_t>& expected, const char* pattern,
                  const at::Device& device) {
  check_rank(op, name, tensor, static_cast<int64_t>(expected.size()), pattern);
  TORCH_CHECK(tensor.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ",
              pattern, " = ", at::IntArrayRef(expected), ", got ", tensor.sizes());
  TORCH_CHECK(at::isFloatingType(tensor.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.device() == device, op, ": ", name, " must be on ", device,
              " (the device of x), got ", tensor.device());
}

// An activation [B, L, D] (x or grad_y): supported dtype, channel stride 1, a device with kernels.
void check_activation(const char* op, const char* name, const at::Tensor& tensor) {
  check_rank(op, name, tensor, 3, "[B, L, D]");
  const c10::DeviceType device = tensor.device().type();
  TORCH_CHECK(has_kernels(device), op, ": ", name, " must be ", kKernelDevices,
              " tensor for these kernels, got ", tensor.device());
  const auto dtype = tensor.scalar_type();
  const bool supported = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                         (dtype == at::kDouble && supports_float64(device));
  TORCH_CHECK(supported, op, ": ", name, " must be float32, bfloat16 or float16",
              supports_float64(device) ? " or float64" : "", " on ",
              c10::DeviceTypeName(device), ", got ", dtype);
  TORCH_CHECK(tensor.size(2) <= 1 || tensor.stride(2) == 1, op, ": ", name,
              " must have stride 1 in its last dimension (D), got strides ", tensor.strides());
}

ScalarType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return ScalarType::Float64;
    case at::kBFloat16: return ScalarType::BFloat16;
    case at::kHalf: return ScalarType::Float16;
    default: return ScalarType::Float32;
  }
}

at::ScalarType accumulation_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks the arguments both ops share and returns the problem's shape.
AdapterShape validate_common(const char* op, const at::Tensor& x,
                             const at::Tensor& down_weight, const at::Tensor& down_bias,
                             const at::Tensor& up_weight, const at::Tensor& up_bias,
                             const at::Tensor& routing_weights, double scale, double dropout_p,
                             int64_t groups) {
  check_activation(op, "x", x);
  AdapterShape shape;
  shape.batch = x.size(0);
  shape.length = x.size(1);
  shape.dim = x.size(2);
  TORCH_CHECK(shape.dim > 0, op, ": x must have D > 0 channels, got shape ", x.sizes());
  check_rank(op, "down_weight", down_weight, 2, "[r, D]");
  shape.rank = down_weight.size(0);
  TORCH_CHECK(shape.rank > 0, op, ": down_weight must have rank r > 0 rows, got shape ",
              down_weight.sizes());
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(shape.rank % groups == 0, op, ": groups (", groups,
              ") must divide the rank r = down_weight.shape[0] = ", shape.rank);
  TORCH_CHECK(shape.dim % groups == 0, op, ": groups (", groups,
              ") must divide D = x.shape[2] = ", shape.dim);
  shape.groups = groups;
  check_rank(op, "up_weight", up_weight, 3, "[E, D, r/groups]");
  shape.experts = up_weight.size(0);
  TORCH_CHECK(shape.experts >= 1, op, ": up_weight must have E >= 1 experts, got shape ",
              up_weight.sizes());
  TORCH_CHECK(x.device().type() != c10::DeviceType::CUDA ||
                  cuda_row_shared_floats(shape.rank, shape.experts) <= kCudaMaxSharedFloatsPerToken,
              op, ": the cuda kernels need E*(r+1)+r <= ", kCudaMaxSharedFloatsPerToken,
              " (shared memory per block), got r = down_weight.shape[0] = ", shape.rank,
              " and E = up_weight.shape[0] = ", shape.experts, "; use the triton backend");
  const at::Device device = x.device();
  check_tensor(op, "down_weight", down_weight, {shape.rank, shape.dim}, "[r, D]", device);
  check_tensor(op, "down_bias", down_bias, {shape.rank}, "[r]", device);
  check_tensor(op, "up_weight", up_weight, {shape.experts, shape.dim, shape.rank / groups},
               "[E, D, r/groups]", device);
  check_tensor(op, "up_bias", up_bias, {shape.experts, shape.dim}, "[E, D]", device);
  check_tensor(op, "routing_weights", routing_weights, {shape.batch, shape.experts}, "[B, E]",
               device);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  return shape;
}

// The dropout seed's address for the kernels: nullptr without dropout (never read then), else
// the data of a 1-element int64 tensor on x's device (not read here: no host read, no sync).
const int64_t* seed_pointer(const char* op, const std::optional<at::Tensor>& seed,
                            double dropout_p, const at::Device& device) {
  if (dropout_p == 0.0) return nullptr;
  TORCH_CHECK(seed.has_value() && seed->defined(), op,
              ": seed must be a 1-element int64 tensor when dropout_p > 0, got None");
  TORCH_CHECK(seed->scalar_type() == at::kLong, op, ": seed must be an int64 tensor, got ",
              seed->scalar_type());
  TORCH_CHECK(seed->numel() == 1, op, ": seed must have 1 element, got shape ", seed->sizes());
  TORCH_CHECK(seed->device() == device, op, ": seed must be on ", device,
              " (the device of x), got ", seed->device());
  return seed->const_data_ptr<int64_t>();
}

RowStrides row_strides(const at::Tensor& activation) {
  return RowStrides{activation.stride(0), activation.stride(1)};
}

// Parameters and coef = scale * routing_weights, contiguous in the accumulation dtype; fills
// the AdapterArgs both kernels read (the tensors must outlive the kernel call).
struct PreparedInputs {
  at::Tensor down_weight, down_bias, up_weight, up_bias, coef;

  PreparedInputs(const AdapterShape& shape, const at::Tensor& x, const at::Tensor& down_w,
                 const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
                 const at::Tensor& routing_weights, double scale, double dropout_p,
                 const int64_t* seed, AdapterArgs& args) {
    const at::ScalarType acc = accumulation_dtype(x);
    down_weight = down_w.to(acc).contiguous();
    down_bias = down_b.to(acc).contiguous();
    up_weight = up_w.to(acc).contiguous();
    up_bias = up_b.to(acc).contiguous();
    coef = (routing_weights.to(acc) * scale).contiguous();
    args.shape = shape;
    args.dtype = kernel_dtype(x.scalar_type());
    args.dropout = DropoutConfig::make(dropout_p, seed);
    args.x = x.data_ptr();
    args.x_strides = row_strides(x);
    args.down_weight = down_weight.data_ptr();
    args.up_weight = up_weight.data_ptr();
    args.up_bias = up_bias.data_ptr();
    args.coef = coef.data_ptr();
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> mm_adapter_forward(
    const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& routing_weights,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed, int64_t groups,
    bool single_modality) {
  const AdapterShape shape = validate_common(kForwardOp, x, down_weight, down_bias,
                                             up_weight, up_bias, routing_weights, scale,
                                             dropout_p, groups);
  const int64_t* seed_data = seed_pointer(kForwardOp, seed, dropout_p, x.device());
  const c10::DeviceGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor hidden = at::empty({shape.batch, shape.length, shape.rank},
                                x.options().dtype(accumulation_dtype(x)));
  if (shape.tokens() == 0) return {y, hidden};
  ForwardArgs args;
  const PreparedInputs inputs(shape, x, down_weight, down_bias, up_weight, up_bias,
                              routing_weights, scale, dropout_p, seed_data, args);
  args.single_modality = single_modality;
  args.down_bias = inputs.down_bias.data_ptr();
  args.y = y.data_ptr();
  args.hidden = hidden.data_ptr();
  run_kernels(x.device().type(), args);
  return {y, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mm_adapter_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& hidden,
                    const at::Tensor& routing_weights, const at::Tensor& down_weight,
                    const at::Tensor& down_bias, const at::Tensor& up_weight,
                    const at::Tensor& up_bias, double scale, double dropout_p,
                    const std::optional<at::Tensor>& seed, int64_t groups) {
  const AdapterShape shape = validate_common(kBackwardOp, x, down_weight, down_bias,
                                             up_weight, up_bias, routing_weights, scale,
                                             dropout_p, groups);
  const int64_t* seed_data = seed_pointer(kBackwardOp, seed, dropout_p, x.device());
  check_activation(kBackwardOp, "grad_y", grad_y);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              kBackwardOp, ": grad_y must have the shape and dtype of x (", x.sizes(), ", ",
              x.scalar_type(), "), got ", grad_y.sizes(), ", ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), kBackwardOp, ": grad_y must be on ", x.device(),
              " (the device of x), got ", grad_y.device());
  check_tensor(kBackwardOp, "hidden", hidden, {shape.batch, shape.length, shape.rank},
               "[B, L, r]", x.device());
  const c10::DeviceGuard guard(x.device());
  const at::ScalarType acc = accumulation_dtype(x);
  const auto acc_options = x.options().dtype(acc);
  // The kernels overwrite every element; without tokens the gradients are zeros.
  auto gradient = [&](at::IntArrayRef sizes) {
    return shape.tokens() > 0 ? at::empty(sizes, acc_options) : at::zeros(sizes, acc_options);
  };
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_down_weight = gradient({shape.rank, shape.dim});
  at::Tensor grad_down_bias = gradient({shape.rank});
  at::Tensor grad_up_weight = gradient(up_weight.sizes());
  at::Tensor grad_up_bias = gradient({shape.experts, shape.dim});
  at::Tensor grad_routing = gradient({shape.batch, shape.experts});
  if (shape.tokens() > 0) {
    BackwardArgs args;
    const PreparedInputs inputs(shape, x, down_weight, down_bias, up_weight, up_bias,
                                routing_weights, scale, dropout_p, seed_data, args);
    const at::Tensor hidden_acc = hidden.to(acc).contiguous();
    at::Tensor workspace = at::empty({workspace_bytes(x.device().type(), shape, args.dtype)},
                                     x.options().dtype(at::kByte));
    args.scale = scale;
    args.grad_y = grad_y.data_ptr();
    args.grad_y_strides = row_strides(grad_y);
    args.hidden = hidden_acc.data_ptr();
    args.workspace = workspace.data_ptr();
    args.grad_x = grad_x.data_ptr();
    args.grad_down_weight = grad_down_weight.data_ptr();
    args.grad_down_bias = grad_down_bias.data_ptr();
    args.grad_up_weight = grad_up_weight.data_ptr();
    args.grad_up_bias = grad_up_bias.data_ptr();
    args.grad_routing_weights = grad_routing.data_ptr();
    run_kernels(x.device().type(), args);
  }
  return {grad_x, grad_down_weight.to(down_weight.scalar_type()),
          grad_down_bias.to(down_bias.scalar_type()), grad_up_weight.to(up_weight.scalar_type()),
          grad_up_bias.to(up_bias.scalar_type()), grad_routing.to(routing_weights.scalar_type())};
}

}  // namespace mlan

TORCH_LIBRARY(mlan_C, library) {
  library.def(
      "mm_adapter_forward(Tensor x, Tensor down_weight, Tensor down_bias, Tensor up_weight, "
      "Tensor up_bias, Tensor routing_weights, float scale, float dropout_p, Tensor? seed, "
      "int groups, bool single_modality) -> (Tensor y, Tensor hidden)");
  library.def(
      "mm_adapter_backward(Tensor grad_y, Tensor x, Tensor hidden, Tensor routing_weights, "
      "Tensor down_weight, Tensor down_bias, Tensor up_weight, Tensor up_bias, float scale, "
      "float dropout_p, Tensor? seed, int groups) -> (Tensor grad_x, Tensor grad_down_weight, "
      "Tensor grad_down_bias, Tensor grad_up_weight, Tensor grad_up_bias, "
      "Tensor grad_routing_weights)");
}

// One implementation, registered for each device it has kernels for.
TORCH_LIBRARY_IMPL(mlan_C, CPU, library) {
  library.impl("mm_adapter_forward", &mlan::mm_adapter_forward);
  library.impl("mm_adapter_backward", &mlan::mm_adapter_backward);
}

#ifdef MLAN_WITH_CUDA
TORCH_LIBRARY_IMPL(mlan_C, CUDA, library) {
  library.impl("mm_adapter_forward", &mlan::mm_adapter_forward);
  library.impl("mm_adapter_backward", &mlan::mm_adapter_backward);
}
#endif
