// MM-Adapter forward and backward as CUDA kernels on raw pointers (no ATen: plain nvcc compiles
// this file; csrc/mm_adapter_api.cpp launches it on the current stream). Same math as the CPU kernels
// (../mm_adapter.h); activations float / bfloat16 / half, everything else float. The dropout
// seed is read by the row kernels from device memory (DropoutConfig::seed), never on the host.
//
//   forward_kernel          one warp per token: H = dropout(x W_Aᵀ + b_A) by warp reductions,
//                           then y = x + Σ_e coef[b,e] (H M_eᵀ + b_U[e]) over the row.
//   backward_rows_kernel    one warp per token: P_e = G M_e (+ bias slot), ∂H_pre (mask
//                           regenerated), the ∂w row term Σ_i P_e[i] H[i] + P_e[bias], and
//                           ∂x = G + ∂H_pre W_A.
//   backward_columns_kernel one thread per column and token split, kOutputsPerThread of the
//                           Q = r + E·S gradient rows (∂W_A rows, then ∂UP_e slot rows) each:
//                           partial[split, q, d] = Σ_{n in split} coefficient(n, q) · source(n, d).
//   reduce_partials_kernel  Σ over splits, scattered into ∂W_A, ∂M (compact), ∂b_U.
//   column_sums_kernel      ∂b_A = Σ_n ∂H_pre[n], ∂w[b] = s Σ_l row term[b, l] (fixed order).
// All reductions have a fixed order and no atomics, so results are run-to-run deterministic.
// Token and element offsets are int64_t; column indices (d < D) are int.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "mm_adapter.h"
#include "philox.h"

namespace mlan {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kCudaRowTokens;  // tokens per block in the row kernels
constexpr int kRowThreads = kWarp * kWarpsPerBlock;
constexpr int kColumnThreads = 128;  // columns per block in the columns kernel
constexpr int kOutputsPerThread = 8;
constexpr int kReduceThreads = 256;

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sizes the kernels need, as plain values.
struct Geometry {
  int64_t tokens, length;
  int dim, rank, experts, groups, per_group, dim_per_group, slots;

  explicit Geometry(const AdapterShape& shape)
      : tokens(shape.tokens()), length(shape.length), dim(static_cast<int>(shape.dim)),
        rank(static_cast<int>(shape.rank)), experts(static_cast<int>(shape.experts)),
        groups(static_cast<int>(shape.groups)),
        per_group(static_cast<int>(shape.rank_per_group())),
        dim_per_group(static_cast<int>(shape.dim_per_group())),
        slots(static_cast<int>(shape.slots())) {}

  __host__ __device__ int gradient_rows() const { return rank + experts * slots; }
};

// The row kernels' thread layout: warp `warp` of block b handles token b·kWarpsPerBlock + warp.
struct WarpToken {
  int warp, lane;
  int64_t n;
};

__device__ __forceinline__ WarpToken warp_token() {
  const int warp = threadIdx.x / kWarp;
  return {warp, static_cast<int>(threadIdx.x % kWarp),
          static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp};
}

// seed: dropout.key(), loaded from device memory once per thread by the row kernels (the host
// never reads it: no sync, and a captured CUDA graph reads the seed tensor's current value).
__device__ __forceinline__ float apply_dropout(float value, const DropoutConfig& dropout,
                                               uint64_t seed, int64_t token, int rank, int unit) {
  if (!dropout.enabled) return value;
  return dropout_keep(seed, dropout.threshold, token, rank, unit)
             ? value * static_cast<float>(dropout.keep_scale) : 0.0f;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
forward_kernel(const scalar_t* __restrict__ x, RowStrides x_strides,
               const float* __restrict__ down_weight, const float* __restrict__ down_bias,
               const float* __restrict__ up_weight, const float* __restrict__ up_bias,
               const float* __restrict__ coef, scalar_t* __restrict__ y,
               float* __restrict__ hidden, Geometry geo, DropoutConfig dropout,
               bool single_modality) {
  extern __shared__ float shared[];  // [kWarpsPerBlock][r]: this warp's token's H
  const WarpToken token = warp_token();
  if (token.n >= geo.tokens) return;  // whole warps leave; no block-wide barrier follows
  const int64_t n = token.n;
  const int lane = token.lane;
  const uint64_t seed = dropout.key();
  float* h = shared + token.warp * geo.rank;
  const scalar_t* x_row = x + x_strides.offset(n, geo.length);
  for (int i = 0; i < geo.rank; ++i) {
    const float* w = down_weight + static_cast<int64_t>(i) * geo.dim;
    float partial = 0.0f;
    for (int d = lane; d < geo.dim; d += kWarp) partial += to_float(x_row[d]) * w[d];
    partial = warp_sum(partial) + down_bias[i];  // every lane holds the sum
    if (lane == i % kWarp) {
      h[i] = apply_dropout(partial, dropout, seed, n, geo.rank, i);
      hidden[n * geo.rank + i] = h[i];
    }
  }
  __syncwarp();
  const float* c = coef + (single_modality ? 0 : n / geo.length) * geo.experts;
  scalar_t* y_row = y + n * geo.dim;
  for (int d = lane; d < geo.dim; d += kWarp) {
    const float* h_group = h + (d / geo.dim_per_group) * geo.per_group;
    float mixed = 0.0f;
    for (int e = 0; e < geo.experts; ++e) {
      const int64_t column = static_cast<int64_t>(e) * geo.dim + d;
      const float* u = up_weight + column * geo.per_group;
      float value = up_bias[column];
      for (int j = 0; j < geo.per_group; ++j) value += h_group[j] * u[j];
      mixed += c[e] * value;
    }
    y_row[d] = from_float<scalar_t>(to_float(x_row[d]) + mixed);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
backward_rows_kernel(const scalar_t* __restrict__ grad_y, RowStrides grad_y_strides,
                     const float* __restrict__ hidden, const float* __restrict__ down_weight,
                     const float* __restrict__ up_weight, const float* __restrict__ up_bias,
                     const float* __restrict__ coef, scalar_t* __restrict__ grad_x,
                     float* __restrict__ grad_hidden, float* __restrict__ row_terms,
                     Geometry geo, DropoutConfig dropout) {
  // Per warp: products [E][r + 1] (P_e, then the bias slot), then ∂H_pre [r].
  extern __shared__ float shared[];
  const WarpToken token = warp_token();
  if (token.n >= geo.tokens) return;
  const int64_t n = token.n;
  const int lane = token.lane, product_stride = geo.rank + 1;
  const uint64_t seed = dropout.key();
  float* products = shared + token.warp * (geo.experts * product_stride + geo.rank);
  float* dh = products + geo.experts * product_stride;
  const scalar_t* g_row = grad_y + grad_y_strides.offset(n, geo.length);

  for (int e = 0; e < geo.experts; ++e) {
    float bias_product = 0.0f;
    for (int k = 0; k < geo.groups; ++k) {
      const int begin = k * geo.dim_per_group, end = begin + geo.dim_per_group;
      for (int j = 0; j < geo.slots; ++j) {  // slot j < r/g: unit k·r/g + j; j = r/g: bias
        float partial = 0.0f;
        for (int d = begin + lane; d < end; d += kWarp) {
          const int64_t column = static_cast<int64_t>(e) * geo.dim + d;
          const float w = j < geo.per_group ? up_weight[column * geo.per_group + j] : up_bias[column];
          partial += to_float(g_row[d]) * w;
        }
        partial = warp_sum(partial);
        if (j < geo.per_group) {
          if (lane == 0) products[e * product_stride + k * geo.per_group + j] = partial;
        } else {
          bias_product += partial;
        }
      }
    }
    if (lane == 0) products[e * product_stride + geo.rank] = bias_product;
  }
  __syncwarp();

  const float* c = coef + (n / geo.length) * geo.experts;
  const float* h = hidden + n * geo.rank;
  for (int i = lane; i < geo.rank; i += kWarp) {  // ∂H_pre = mask ⊙ Σ_e coef P_e / (1-p)
    float value = 0.0f;
    for (int e = 0; e < geo.experts; ++e) value += c[e] * products[e * product_stride + i];
    dh[i] = apply_dropout(value, dropout, seed, n, geo.rank, i);
    grad_hidden[n * geo.rank + i] = dh[i];
  }
  for (int e = lane; e < geo.experts; e += kWarp) {  // ∂w row term
    float term = products[e * product_stride + geo.rank];
    for (int i = 0; i < geo.rank; ++i) term += products[e * product_stride + i] * h[i];
    row_terms[n * geo.experts + e] = term;
  }
  __syncwarp();

  scalar_t* gx_row = grad_x + n * geo.dim;
  for (int d = lane; d < geo.dim; d += kWarp) {  // ∂x = G + ∂H_pre W_A
    float value = to_float(g_row[d]);
    for (int i = 0; i < geo.rank; ++i) value += dh[i] * down_weight[static_cast<int64_t>(i) * geo.dim + d];
    gx_row[d] = from_float<scalar_t>(value);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kColumnThreads)
backward_columns_kernel(const scalar_t* __restrict__ grad_y, RowStrides grad_y_strides,
                        const scalar_t* __restrict__ x, RowStrides x_strides,
                        const float* __restrict__ hidden, const float* __restrict__ grad_hidden,
                        const float* __restrict__ coef, float* __restrict__ partial,
                        Geometry geo, int64_t tokens_per_split) {
  const int d = blockIdx.x * kColumnThreads + threadIdx.x;
  if (d >= geo.dim) return;
  const int64_t split = blockIdx.y;
  const int q0 = blockIdx.z * kOutputsPerThread, rows = geo.gradient_rows();
  const int hidden_base = (d / geo.dim_per_group) * geo.per_group;
  // Output q < r: ∂W_A[q] (source x, coefficient ∂H_pre[n, q]). Output q = r + e·S + j:
  // ∂UP_e slot j (source G, coefficient coef[b, e] · (j < r/g ? H[n, group·r/g + j] : 1)).
  int expert[kOutputsPerThread], unit[kOutputsPerThread];
  bool needs_x = false, needs_g = false;
#pragma unroll
  for (int o = 0; o < kOutputsPerThread; ++o) {
    const int q = q0 + o, slot = (q - geo.rank) % geo.slots;
    expert[o] = q < geo.rank ? -1 : (q - geo.rank) / geo.slots;
    unit[o] = q < geo.rank ? q : (slot < geo.per_group ? hidden_base + slot : -1);
    needs_x |= q < geo.rank;
    needs_g |= q >= geo.rank && q < rows;
  }
  float sums[kOutputsPerThread] = {};
  const int64_t begin = split * tokens_per_split;
  const int64_t end = begin + tokens_per_split < geo.tokens ? begin + tokens_per_split : geo.tokens;
  int64_t sample = begin / geo.length, position = begin % geo.length;
  for (int64_t n = begin; n < end; ++n) {
    const float x_value = needs_x ? to_float(x[sample * x_strides.batch + position * x_strides.token + d]) : 0.0f;
    const float g_value = needs_g
        ? to_float(grad_y[sample * grad_y_strides.batch + position * grad_y_strides.token + d]) : 0.0f;
    const float* c = coef + sample * geo.experts;
#pragma unroll
    for (int o = 0; o < kOutputsPerThread; ++o) {
      if (q0 + o >= rows) continue;
      if (expert[o] < 0) {
        sums[o] += grad_hidden[n * geo.rank + unit[o]] * x_value;
      } else {
        const float h = unit[o] < 0 ? 1.0f : hidden[n * geo.rank + unit[o]];
        sums[o] += c[expert[o]] * h * g_value;
      }
    }
    if (++position == geo.length) {
      position = 0;
      ++sample;
    }
  }
#pragma unroll
  for (int o = 0; o < kOutputsPerThread; ++o)
    if (q0 + o < rows) partial[(split * rows + q0 + o) * geo.dim + d] = sums[o];
}

__global__ void reduce_partials_kernel(const float* __restrict__ partial, int64_t splits,
                                       Geometry geo, float* __restrict__ grad_down_weight,
                                       float* __restrict__ grad_up_weight,
                                       float* __restrict__ grad_up_bias) {
  const int rows = geo.gradient_rows();
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<int64_t>(rows) * geo.dim) return;
  const int q = static_cast<int>(index / geo.dim), d = static_cast<int>(index % geo.dim);
  float total = 0.0f;
  for (int64_t split = 0; split < splits; ++split) total += partial[split * rows * geo.dim + index];
  if (q < geo.rank) {
    grad_down_weight[index] = total;
    return;
  }
  const int e = (q - geo.rank) / geo.slots, j = (q - geo.rank) % geo.slots;
  const int64_t column = static_cast<int64_t>(e) * geo.dim + d;
  if (j < geo.per_group) grad_up_weight[column * geo.per_group + j] = total;
  else grad_up_bias[column] = total;
}

// out[batch][c] = scale · Σ_{m < rows} in[batch][m][c] for a [batches, rows, columns] input;
// one block per (batch, c) (flat block index batch · columns + c), a fixed tree order.
__global__ void __launch_bounds__(kReduceThreads)
column_sums_kernel(const float* __restrict__ in, int64_t rows, int columns, float scale,
                   float* __restrict__ out) {
  __shared__ float warp_totals[kReduceThreads / kWarp];
  const int64_t batch = blockIdx.x / columns;
  const int c = static_cast<int>(blockIdx.x % columns);
  const float* base = in + batch * rows * columns;
  float partial = 0.0f;
  for (int64_t m = threadIdx.x; m < rows; m += kReduceThreads) partial += base[m * columns + c];
  partial = warp_sum(partial);
  if (threadIdx.x % kWarp == 0) warp_totals[threadIdx.x / kWarp] = partial;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kReduceThreads / kWarp; ++w) total += warp_totals[w];
    out[batch * columns + c] = scale * total;
  }
}

// Token splits of the columns kernel: enough blocks for ~4 waves on the current device.
int64_t token_splits(const Geometry& geo) {
  int device = 0, processors = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
  const int64_t column_blocks = (geo.dim + kColumnThreads - 1) / kColumnThreads;
  const int64_t output_blocks = (geo.gradient_rows() + kOutputsPerThread - 1) / kOutputsPerThread;
  const int64_t wanted = (4 * processors + column_blocks * output_blocks - 1) / (column_blocks * output_blocks);
  return std::max<int64_t>(1, std::min<int64_t>(wanted, (geo.tokens + 63) / 64));
}

// Workspace (float): grad_hidden [N, r] | row_terms [N, E] | partial [splits, Q, D].
struct Workspace {
  float *grad_hidden, *row_terms, *partial;
  int64_t splits, floats;

  Workspace(const Geometry& geo, void* base)
      : grad_hidden(static_cast<float*>(base)), row_terms(nullptr), partial(nullptr),
        splits(token_splits(geo)) {
    const int64_t hidden_floats = geo.tokens * geo.rank, row_floats = geo.tokens * geo.experts;
    floats = hidden_floats + row_floats + splits * geo.gradient_rows() * geo.dim;
    if (base != nullptr) {
      row_terms = grad_hidden + hidden_floats;
      partial = row_terms + row_floats;
    }
  }
};

template <typename scalar_t>
void launch_forward(const ForwardArgs& args, cudaStream_t stream) {
  const Geometry geo(args.shape);
  const int64_t blocks = (geo.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const size_t shared = sizeof(float) * kWarpsPerBlock * geo.rank;
  forward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRowThreads, shared, stream>>>(
      static_cast<const scalar_t*>(args.x), args.x_strides,
      static_cast<const float*>(args.down_weight), static_cast<const float*>(args.down_bias),
      static_cast<const float*>(args.up_weight), static_cast<const float*>(args.up_bias),
      static_cast<const float*>(args.coef), static_cast<scalar_t*>(args.y),
      static_cast<float*>(args.hidden), geo, args.dropout, args.single_modality);
}

template <typename scalar_t>
void launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  const Geometry geo(args.shape);
  const Workspace workspace(geo, args.workspace);
  const auto* grad_y = static_cast<const scalar_t*>(args.grad_y);
  const auto* coef = static_cast<const float*>(args.coef);
  const auto* hidden = static_cast<const float*>(args.hidden);

  const int64_t row_blocks = (geo.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const size_t row_shared = sizeof(float) * kWarpsPerBlock * cuda_row_shared_floats(geo.rank, geo.experts);
  backward_rows_kernel<scalar_t><<<static_cast<unsigned>(row_blocks), kRowThreads, row_shared, stream>>>(
      grad_y, args.grad_y_strides, hidden, static_cast<const float*>(args.down_weight),
      static_cast<const float*>(args.up_weight), static_cast<const float*>(args.up_bias), coef,
      static_cast<scalar_t*>(args.grad_x), workspace.grad_hidden, workspace.row_terms, geo,
      args.dropout);

  const int64_t tokens_per_split = (geo.tokens + workspace.splits - 1) / workspace.splits;
  const dim3 column_grid((geo.dim + kColumnThreads - 1) / kColumnThreads,
                         static_cast<unsigned>(workspace.splits),
                         (geo.gradient_rows() + kOutputsPerThread - 1) / kOutputsPerThread);
  backward_columns_kernel<scalar_t><<<column_grid, kColumnThreads, 0, stream>>>(
      grad_y, args.grad_y_strides, static_cast<const scalar_t*>(args.x), args.x_strides, hidden,
      workspace.grad_hidden, coef, workspace.partial, geo, tokens_per_split);

  const int64_t outputs = static_cast<int64_t>(geo.gradient_rows()) * geo.dim;
  reduce_partials_kernel<<<static_cast<unsigned>((outputs + kReduceThreads - 1) / kReduceThreads),
                           kReduceThreads, 0, stream>>>(
      workspace.partial, workspace.splits, geo, static_cast<float*>(args.grad_down_weight),
      static_cast<float*>(args.grad_up_weight), static_cast<float*>(args.grad_up_bias));
  column_sums_kernel<<<geo.rank, kReduceThreads, 0, stream>>>(
      workspace.grad_hidden, geo.tokens, geo.rank, 1.0f, static_cast<float*>(args.grad_down_bias));
  column_sums_kernel<<<static_cast<unsigned>(args.shape.batch * geo.experts), kReduceThreads, 0,
                       stream>>>(workspace.row_terms, geo.length, geo.experts,
                                 static_cast<float>(args.scale),
                                 static_cast<float*>(args.grad_routing_weights));
}

// fn(scalar_t{}) for the activations' dtype (Float64 is rejected by the glue before this).
template <typename Fn>
void dispatch_dtype(ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case ScalarType::BFloat16: return fn(__nv_bfloat16{});
    case ScalarType::Float16: return fn(__half{});
    default: return fn(float{});
  }
}

}  // namespace

int64_t backward_workspace_bytes_cuda(const AdapterShape& shape, ScalarType) {
  return static_cast<int64_t>(sizeof(float)) * Workspace(Geometry(shape), nullptr).floats;
}

void forward_cuda(const ForwardArgs& args, void* stream) {
  if (args.shape.tokens() == 0) return;
  dispatch_dtype(args.dtype, [&](auto scalar) {
    launch_forward<decltype(scalar)>(args, static_cast<cudaStream_t>(stream));
  });
}

void backward_cuda(const BackwardArgs& args, void* stream) {
  if (args.shape.tokens() == 0) return;
  dispatch_dtype(args.dtype, [&](auto scalar) {
    launch_backward<decltype(scalar)>(args, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace mlan
