// The compiled MM-Adapter kernels' C++ interface: raw pointers and plain structs, no ATen, so
// the CPU kernels, the CUDA kernels (plain nvcc) and the ATen glue all include this one header.
//
// Notation (docs/mm_adapter.md): x [B, L, D], N = B*L tokens, rank r, E experts,
// g groups, scale s. The token-wise work of
//     H = dropout(x W_Aᵀ + b_A)                        [N, r]
//     y = x + Σ_e coef[b, e] (H M_eᵀ + b_U[e])        coef = s · routing weights  [B, E]
// and its backward (without the router/softmax part, done in Python for every backend).
//
// Precision: activations x, y, grad_y, grad_x are `dtype`; everything else (parameters, coef,
// hidden, parameter gradients, workspace) is the accumulation type acc_t = double for Float64
// activations, float otherwise. The glue converts parameters to acc_t before the call.
// Indexing: every element offset is int64_t (N·D may exceed 2^31).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MLAN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MLAN_HOST_DEVICE inline
#endif

namespace mlan {

enum class ScalarType : int32_t { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// CUDA row kernels: tokens per block, and the dynamic shared memory they need per token, in
// floats (forward r, backward E·(r+1)+r, the larger). Launches stay within the 48 KiB default
// without opting in, so the API rejects larger (r, E) with a message instead of a failed launch.
constexpr int kCudaRowTokens = 8;
constexpr int64_t kCudaMaxSharedFloatsPerToken = 48 * 1024 / (4 * kCudaRowTokens);
MLAN_HOST_DEVICE int64_t cuda_row_shared_floats(int64_t rank, int64_t experts) {
  return experts * (rank + 1) + rank;
}

struct AdapterShape {
  int64_t batch = 0, length = 0, dim = 0, rank = 0, experts = 0, groups = 1;

  int64_t tokens() const { return batch * length; }
  int64_t rank_per_group() const { return rank / groups; }
  int64_t dim_per_group() const { return dim / groups; }
  // Up-projection "slots" per expert and group: r/g weight columns plus the bias (constant 1).
  int64_t slots() const { return rank / groups + 1; }
};

// Element strides of the rows of a [B, L, D] activation whose channel stride is 1.
struct RowStrides {
  int64_t batch = 0, token = 0;
  MLAN_HOST_DEVICE int64_t offset(int64_t token_index, int64_t length) const {
    return (token_index / length) * batch + (token_index % length) * token;
  }
};

// Dropout of the hidden units, regenerated from (seed, token, unit) by Philox (philox.h):
// keep[n, i] = (philox(seed, n*r + i) >> 8) >= threshold, threshold = round(p * 2^24).
// The seed is not a value here but a pointer to the int64 seed in the memory of the kernels'
// device (a 1-element int64 tensor's data), read by the kernels themselves: the CUDA kernels
// load it from device memory, so the host never reads a CUDA seed (no device sync; CUDA-graph
// capturable), and the CPU kernels read it from host memory. Without dropout it is never read
// and may be null.
struct DropoutConfig {
  const int64_t* seed = nullptr;
  uint32_t threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p)
  bool enabled = false;

  static DropoutConfig make(double p, const int64_t* seed) {
    DropoutConfig config;
    config.seed = seed;
    config.enabled = p > 0.0;
    // nearbyint rounds half to even, like Python's round() in reference.dropout_threshold.
    config.threshold = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
    config.keep_scale = 1.0 / (1.0 - p);
    return config;
  }

  // The Philox key: the seed's 64 bits (read through `seed`, so call it where that memory
  // lives: in a CUDA kernel for a CUDA seed); 0 without dropout, when nothing is read.
  MLAN_HOST_DEVICE uint64_t key() const {
    return enabled ? static_cast<uint64_t>(*seed) : uint64_t{0};
  }
};

// What forward and backward both read.
struct AdapterArgs {
  AdapterShape shape;
  ScalarType dtype = ScalarType::Float32;
  DropoutConfig dropout;
  const void* x = nullptr;            // [B, L, D] dtype, rows at x_strides
  RowStrides x_strides;
  const void* down_weight = nullptr;  // [r, D]       acc_t
  const void* up_weight = nullptr;    // [E, D, r/g]  acc_t
  const void* up_bias = nullptr;      // [E, D]       acc_t
  const void* coef = nullptr;         // [B, E]       acc_t, s · routing weights
};

struct ForwardArgs : AdapterArgs {
  bool single_modality = false;    // every sample uses coef[0] (the caller guarantees equal rows)
  const void* down_bias = nullptr;  // [r] acc_t
  void* y = nullptr;                // [N, D] dtype, contiguous (out)
  void* hidden = nullptr;           // [N, r] acc_t, post-dropout H (out)
};

struct BackwardArgs : AdapterArgs {
  double scale = 1.0;                // s (grad_routing_weights is ∂/∂ routing weights, not ∂/∂ coef)
  const void* grad_y = nullptr;      // [B, L, D] dtype, rows at grad_y_strides
  RowStrides grad_y_strides;
  const void* hidden = nullptr;      // [N, r] acc_t from the forward
  void* workspace = nullptr;         // backward_workspace_bytes_*(shape, dtype) bytes
  // Outputs (overwritten): grad_x [N, D] dtype contiguous, WITHOUT the router term;
  // the rest acc_t: grad_down_weight [r, D], grad_down_bias [r], grad_up_weight [E, D, r/g],
  // grad_up_bias [E, D], grad_routing_weights [B, E].
  void* grad_x = nullptr;
  void* grad_down_weight = nullptr;
  void* grad_down_bias = nullptr;
  void* grad_up_weight = nullptr;
  void* grad_up_bias = nullptr;
  void* grad_routing_weights = nullptr;
};

// CPU (csrc/cpu): at::parallel_for over token blocks; all four dtypes. Results do not depend
// on the thread count (fixed token chunks, fixed reduction order).
int64_t backward_workspace_bytes_cpu(const AdapterShape& shape, ScalarType dtype);
void forward_cpu(const ForwardArgs& args);
void backward_cpu(const BackwardArgs& args);

// CUDA (csrc/cuda): Float32, BFloat16, Float16 activations, float accumulation; `stream` is a
// cudaStream_t on the current device. The workspace size depends on the current device's SM count.
int64_t backward_workspace_bytes_cuda(const AdapterShape& shape, ScalarType dtype);
void forward_cuda(const ForwardArgs& args, void* stream);
void backward_cuda(const BackwardArgs& args, void* stream);

}  // namespace mlan
