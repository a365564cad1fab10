// ATen-level entry points of the low-level ops `mlan_C::mm_adapter_forward` and
// `mlan_C::mm_adapter_backward` (schemas in mm_adapter_api.cpp). One device-generic
// implementation validates every argument, prepares the tensors and calls a device's kernels
// (a KernelSet); each device's glue registers it with register_mm_adapter_impls<&its_set>.
// The user-facing op `mlan::mm_adapter` (Python custom_op: routing, autograd, torch.compile)
// calls these from its `cpu`/`cuda` backends.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "mm_adapter.h"

namespace mlan {

struct KernelSet {
  c10::DeviceType device_type;
  bool supports_float64;
  int64_t (*workspace_bytes)(const AdapterShape&, ScalarType);
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
};

// (y [B, L, D] x.dtype, hidden [B, L, r] acc dtype).
std::tuple<at::Tensor, at::Tensor> mm_adapter_forward(
    const KernelSet& kernels, const at::Tensor& x, const at::Tensor& down_weight,
    const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias,
    const at::Tensor& routing_weights, double scale, double dropout_p, int64_t seed,
    int64_t groups, bool single_modality);

// (grad_x without the router term, grad_down_weight, grad_down_bias, grad_up_weight,
//  grad_up_bias in their parameters' dtypes, grad_routing_weights in routing_weights' dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mm_adapter_backward(const KernelSet& kernels, const at::Tensor& grad_y, const at::Tensor& x,
                    const at::Tensor& hidden, const at::Tensor& routing_weights,
                    const at::Tensor& down_weight, const at::Tensor& down_bias,
                    const at::Tensor& up_weight, const at::Tensor& up_bias, double scale,
                    double dropout_p, int64_t seed, int64_t groups);

// The two ops bound to one KernelSet, as plain functions the dispatcher can register.
template <const KernelSet* kKernels>
struct BoundOps {
  static std::tuple<at::Tensor, at::Tensor> forward(
      const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
      const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& routing_weights,
      double scale, double dropout_p, int64_t seed, int64_t groups, bool single_modality) {
    return mm_adapter_forward(*kKernels, x, down_weight, down_bias, up_weight, up_bias,
                              routing_weights, scale, dropout_p, seed, groups, single_modality);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& hidden,
           const at::Tensor& routing_weights, const at::Tensor& down_weight,
           const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias,
           double scale, double dropout_p, int64_t seed, int64_t groups) {
    return mm_adapter_backward(*kKernels, grad_y, x, hidden, routing_weights, down_weight,
                               down_bias, up_weight, up_bias, scale, dropout_p, seed, groups);
  }
};

template <const KernelSet* kKernels>
void register_mm_adapter_impls(torch::Library& library) {
  library.impl("mm_adapter_forward", &BoundOps<kKernels>::forward);
  library.impl("mm_adapter_backward", &BoundOps<kKernels>::backward);
}

}  // namespace mlan
