// Fused MM-Adapter backward on CPU: one pass over (grad_y, x, H) per token tile.
//
// Tokens are cut into a fixed number of chunks (a function of N only) that run in parallel;
// each chunk owns a partial-gradient buffer in the workspace, and the partials are summed in
// chunk order at the end, so results are bitwise independent of the thread count.
// Within a chunk, tiles of kTileTokens tokens:
//   rows pass (per token n, sample b):   P_e = G M_e (+ bias slot G·b_U[e])   [E, r+1]
//       ∂H = Σ_e coef[b,e] P_e,  ∂H_pre = ∂H ⊙ keep / (1-p)                   [r]
//       row term of ∂w: Σ_i P_e[i] H[i] + P_e[bias]                           [E]
//   columns pass (per block of kBlockColumns columns of all tile tokens, copied into packed
//   buffers so the tile's rows are read sequentially):
//       ∂x = G + ∂H_pre W_A,  partial ∂W_A += ∂H_preᵀ x,
//       partial ∂UP_e[slot] += (coef[b,e] H_aug)ᵀ G      (∂M_e and ∂b_U in one product)
// Then: ∂W_A, ∂M, ∂b_U, ∂b_A = Σ chunks; ∂w[b, e] = s Σ_l row term.
#include <ATen/Parallel.h>

#include "cpu/cpu_kernel_utils.h"
#include "philox.h"

namespace mlan {
namespace cpu {
namespace {

constexpr int64_t kChunkTokens = 128;  // tokens per chunk, at least (while chunks < kMaxChunks)
constexpr int64_t kMaxChunks = 32;     // bounds the partial buffers' memory
constexpr int64_t kTileTokens = 16;    // tokens whose columns are processed together
constexpr int64_t kBlockColumns = 128; // columns of the tile's rows packed at a time

int64_t chunk_count(int64_t tokens) {
  return std::max<int64_t>(1, std::min(kMaxChunks, (tokens + kChunkTokens - 1) / kChunkTokens));
}

// Workspace (acc_t): per chunk [(r + E*S) partial gradient rows, row_stride apart | r for ∂b_A],
// then the per-token ∂w row terms [N, E].
struct WorkspaceLayout {
  PaddedColumns columns;
  int64_t gradient_rows, partial_size, chunks, row_terms_offset, total;

  WorkspaceLayout(const AdapterShape& shape, int64_t lanes)
      : columns(shape, lanes),
        gradient_rows(shape.rank + shape.experts * shape.slots()),
        partial_size(gradient_rows * columns.row_stride + shape.rank),
        chunks(chunk_count(shape.tokens())),
        row_terms_offset(chunks * partial_size),
        total(row_terms_offset + shape.tokens() * shape.experts) {}
};

template <typename scalar_t, typename acc_t>
struct BackwardKernel {
  static constexpr int64_t lanes = kLanes<acc_t>;

  const BackwardArgs& args;
  const AdapterShape& shape;
  const WorkspaceLayout layout;
  const PaddedColumns& columns;
  const PaddedWeights<acc_t> weights;
  const int64_t slots, per_group, products;  // products = E*S dot products per group
  const uint64_t seed;                       // the dropout key, read once (host memory)
  acc_t* const workspace;

  explicit BackwardKernel(const BackwardArgs& a)
      : args(a), shape(a.shape), layout(a.shape, lanes), columns(layout.columns),
        weights(a.shape, layout.columns, static_cast<const acc_t*>(a.down_weight),
                static_cast<const acc_t*>(a.up_weight), static_cast<const acc_t*>(a.up_bias)),
        slots(a.shape.slots()), per_group(a.shape.rank_per_group()),
        products(a.shape.experts * a.shape.slots()), seed(a.dropout.key()),
        workspace(static_cast<acc_t*>(a.workspace)) {}

  // Per-task scratch: one padded grad_y row, the tile's ∂H_pre [T, r] and mixed hidden
  // coef·H_aug [T, E, g, S], and packed blocks of x, grad_y and grad_x [T, block_stride].
  static constexpr int64_t block_stride = kBlockColumns + lanes;  // skewed, like row_stride
  struct Tile {
    std::vector<acc_t> g_row, dots, grad_hidden, mixed_hidden, x_block, g_block, gx_block;
    std::vector<const scalar_t*> x_rows, g_rows;
    explicit Tile(const BackwardKernel& k)
        : g_row(k.columns.width), dots(k.shape.groups * k.products),
          grad_hidden(kTileTokens * k.shape.rank),
          mixed_hidden(kTileTokens * k.shape.experts * k.shape.groups * k.slots),
          x_block(kTileTokens * block_stride), g_block(kTileTokens * block_stride),
          gx_block(kTileTokens * block_stride), x_rows(kTileTokens), g_rows(kTileTokens) {}
  };

  const acc_t* coef_of(int64_t token) const {
    return static_cast<const acc_t*>(args.coef) + token / shape.length * shape.experts;
  }

  // Rows pass for token n (tile slot t): ∂H_pre, the ∂w row term, coef·H_aug, partial ∂b_A.
  void token_rows(int64_t n, int64_t t, Tile& tile, acc_t* partial_bias) const {
    const int64_t rank = shape.rank, experts = shape.experts, stride = columns.group_stride;
    gather_row(tile.g_rows[t], columns, tile.g_row.data());
    for (int64_t k = 0; k < shape.groups; ++k)  // dots[k][e*S + j] = G[group k] · UP_e[j]
      dot_rows(tile.g_row.data() + k * stride, weights.up.data() + k * stride,
               columns.row_stride, products, stride, tile.dots.data() + k * products);
    auto product = [&](int64_t e, int64_t unit) {  // P_e[unit] of the dense block-diagonal M_e
      return tile.dots[unit / per_group * products + e * slots + unit % per_group];
    };
    const acc_t* coef = coef_of(n);
    const acc_t* hidden = static_cast<const acc_t*>(args.hidden) + n * rank;
    const acc_t keep_scale = static_cast<acc_t>(args.dropout.keep_scale);
    acc_t* grad_hidden = tile.grad_hidden.data() + t * rank;
    for (int64_t i = 0; i < rank; ++i) {
      acc_t value = 0;
      for (int64_t e = 0; e < experts; ++e) value += coef[e] * product(e, i);
      if (args.dropout.enabled)
        value = dropout_keep(seed, args.dropout.threshold, n, rank, i)
                    ? value * keep_scale : acc_t(0);
      grad_hidden[i] = value;
      partial_bias[i] += value;
    }
    acc_t* row_terms = workspace + layout.row_terms_offset + n * experts;
    acc_t* mixed = tile.mixed_hidden.data() + t * experts * shape.groups * slots;
    for (int64_t e = 0; e < experts; ++e) {
      acc_t term = 0;
      for (int64_t i = 0; i < rank; ++i) term += product(e, i) * hidden[i];
      for (int64_t k = 0; k < shape.groups; ++k) {
        term += tile.dots[k * products + e * slots + per_group];  // bias slot: G · b_U[e]
        acc_t* slot = mixed + (e * shape.groups + k) * slots;
        for (int64_t j = 0; j < per_group; ++j) slot[j] = coef[e] * hidden[k * per_group + j];
        slot[per_group] = coef[e];
      }
      row_terms[e] = term;
    }
  }

  // Columns pass for the tile's `count` tokens starting at token n0, one column block at a time.
  void tile_columns(int64_t n0, int64_t count, Tile& tile, acc_t* partial) const {
    const int64_t rank = shape.rank, stride = columns.row_stride;
    const int64_t mixed_stride = shape.experts * shape.groups * slots;
    auto* grad_x = static_cast<scalar_t*>(args.grad_x);
    for (int64_t k = 0; k < shape.groups; ++k) {
      for (int64_t b0 = 0; b0 < columns.dim_per_group; b0 += kBlockColumns) {
        const int64_t valid = std::min(kBlockColumns, columns.dim_per_group - b0);
        const int64_t block = (valid + lanes - 1) / lanes * lanes;  // whole chunks, zero-padded
        const int64_t padded = k * columns.group_stride + b0, real = k * columns.dim_per_group + b0;
        for (int64_t t = 0; t < count; ++t) {
          load_segment(tile.x_rows[t] + real, valid, block, tile.x_block.data() + t * block_stride);
          load_segment(tile.g_rows[t] + real, valid, block, tile.g_block.data() + t * block_stride);
        }
        for (int64_t t = 0; t < count; ++t) {  // ∂x = G + ∂H_pre W_A
          acc_t* out = tile.gx_block.data() + t * block_stride;
          combine_rows(tile.g_block.data() + t * block_stride, tile.grad_hidden.data() + t * rank, 1,
                       weights.down.data() + padded, stride, rank, block, out);
          store_segment(out, valid, grad_x + (n0 + t) * shape.dim + real);
        }
        for (int64_t i = 0; i < rank; ++i) {  // ∂W_A[i] += Σ_t ∂H_pre[t, i] x[t]
          acc_t* row = partial + i * stride + padded;
          combine_rows(row, tile.grad_hidden.data() + i, rank, tile.x_block.data(), block_stride,
                       count, block, row);
        }
        for (int64_t e = 0; e < shape.experts; ++e) {  // ∂UP_e[j] += Σ_t coef H_aug[t, j] G[t]
          for (int64_t j = 0; j < slots; ++j) {
            acc_t* row = partial + (rank + e * slots + j) * stride + padded;
            const acc_t* coeffs = tile.mixed_hidden.data() + (e * shape.groups + k) * slots + j;
            combine_rows(row, coeffs, mixed_stride, tile.g_block.data(), block_stride, count,
                         block, row);
          }
        }
      }
    }
  }

  void run_chunk(int64_t chunk, Tile& tile) const {
    acc_t* partial = workspace + chunk * layout.partial_size;
    std::fill(partial, partial + layout.partial_size, acc_t(0));
    acc_t* partial_bias = partial + layout.gradient_rows * columns.row_stride;
    const int64_t tokens = shape.tokens();
    const int64_t begin = chunk * tokens / layout.chunks, end = (chunk + 1) * tokens / layout.chunks;
    const auto* x = static_cast<const scalar_t*>(args.x);
    const auto* grad_y = static_cast<const scalar_t*>(args.grad_y);
    for (int64_t n0 = begin; n0 < end; n0 += kTileTokens) {
      const int64_t count = std::min(kTileTokens, end - n0);
      for (int64_t t = 0; t < count; ++t) {
        tile.x_rows[t] = x + args.x_strides.offset(n0 + t, shape.length);
        tile.g_rows[t] = grad_y + args.grad_y_strides.offset(n0 + t, shape.length);
        token_rows(n0 + t, t, tile, partial_bias);
      }
      tile_columns(n0, count, tile, partial);
    }
  }

  // Sum the chunks' partials (in chunk order) into the parameter gradients; ∂w from row terms.
  void reduce() const {
    const int64_t rank = shape.rank, dim = shape.dim, width = columns.width;
    const int64_t stride = columns.row_stride;
    auto* grad_down_weight = static_cast<acc_t*>(args.grad_down_weight);
    auto* grad_up_weight = static_cast<acc_t*>(args.grad_up_weight);
    auto* grad_up_bias = static_cast<acc_t*>(args.grad_up_bias);
    at::parallel_for(0, layout.gradient_rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(width);
      for (int64_t q = begin; q < end; ++q) {
        std::fill(sums.begin(), sums.end(), acc_t(0));
        for (int64_t chunk = 0; chunk < layout.chunks; ++chunk) {
          const acc_t* row = workspace + chunk * layout.partial_size + q * stride;
          for (int64_t c = 0; c < width; ++c) sums[c] += row[c];
        }
        const int64_t e = (q - rank) / slots, j = (q - rank) % slots;
        for (int64_t column = 0; column < width; ++column) {
          const int64_t d = columns.real(column);
          if (d < 0) continue;
          if (q < rank) grad_down_weight[q * dim + d] = sums[column];
          else if (j < per_group) grad_up_weight[(e * dim + d) * per_group + j] = sums[column];
          else grad_up_bias[e * dim + d] = sums[column];
        }
      }
    });
    auto* grad_down_bias = static_cast<acc_t*>(args.grad_down_bias);
    for (int64_t i = 0; i < rank; ++i) {
      acc_t total = 0;
      for (int64_t chunk = 0; chunk < layout.chunks; ++chunk)
        total += workspace[chunk * layout.partial_size + layout.gradient_rows * stride + i];
      grad_down_bias[i] = total;
    }
    auto* grad_routing = static_cast<acc_t*>(args.grad_routing_weights);
    const acc_t* row_terms = workspace + layout.row_terms_offset;
    for (int64_t b = 0; b < shape.batch; ++b) {
      for (int64_t e = 0; e < shape.experts; ++e) {
        acc_t total = 0;
        for (int64_t l = 0; l < shape.length; ++l) total += row_terms[(b * shape.length + l) * shape.experts + e];
        grad_routing[b * shape.experts + e] = static_cast<acc_t>(args.scale) * total;
      }
    }
  }

  void run() const {
    at::parallel_for(0, layout.chunks, 1, [&](int64_t begin, int64_t end) {
      Tile tile(*this);
      for (int64_t chunk = begin; chunk < end; ++chunk) run_chunk(chunk, tile);
    });
    reduce();
  }
};

}  // namespace
}  // namespace cpu

int64_t backward_workspace_bytes_cpu(const AdapterShape& shape, ScalarType dtype) {
  const int64_t acc_bytes = dtype == ScalarType::Float64 ? 8 : 4;
  return cpu::WorkspaceLayout(shape, 64 / acc_bytes).total * acc_bytes;
}

void backward_cpu(const BackwardArgs& args) {
  cpu::dispatch_dtype(args.dtype, [&](auto scalar, auto acc) {
    cpu::BackwardKernel<decltype(scalar), decltype(acc)>(args).run();
  });
}

}  // namespace mlan
