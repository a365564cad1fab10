// ATen-level entry points of the low-level ops `mlan_C::mm_adapter_forward` and
// `mlan_C::mm_adapter_backward` (schemas and registration in mm_adapter_api.cpp). One
// device-generic implementation validates every argument, prepares the tensors and runs the
// kernels of x's device: csrc/cpu always, csrc/cuda when built with MLAN_WITH_CUDA. The same
// two functions are registered for the CPU and the CUDA dispatch keys.
// seed: a 1-element int64 tensor on x's device when dropout_p > 0 (else ignored); the kernels
// read it through its data pointer, the host never does (no sync for a CUDA seed).
// The user-facing op `mlan::mm_adapter` (Python custom_op: routing, autograd, torch.compile)
// calls these from its `cpu`/`cuda` backends.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace mlan {

// (y [B, L, D] x.dtype, hidden [B, L, r] acc dtype).
std::tuple<at::Tensor, at::Tensor> mm_adapter_forward(
    const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& routing_weights,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed, int64_t groups,
    bool single_modality);

// (grad_x without the router term, grad_down_weight, grad_down_bias, grad_up_weight,
//  grad_up_bias in their parameters' dtypes, grad_routing_weights in routing_weights' dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mm_adapter_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& hidden,
                    const at::Tensor& routing_weights, const at::Tensor& down_weight,
                    const at::Tensor& down_bias, const at::Tensor& up_weight,
                    const at::Tensor& up_bias, double scale, double dropout_p,
                    const std::optional<at::Tensor>& seed, int64_t groups);

}  // namespace mlan
