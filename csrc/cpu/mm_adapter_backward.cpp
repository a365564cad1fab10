// Fused MM-Adapter backward on CPU: one pass over (grad_y, x, H), a tile of token rows at a time.
//
// Tokens are cut into a fixed number of chunks (a function of N only) that run in parallel;
// each chunk owns a partial-gradient buffer in the workspace, and the partials are summed in
// chunk order at the end, so results are bitwise independent of the thread count.
// Within a chunk, tiles of up to kTileTokens tokens of one sample b (micro-kernels of
// tile_kernels.h; U_b = Σ_e coef[b,e] UP_e formed once per sample and task):
//   ∂H[t, k r/g + j] = G_k[t] · U_b[j]_k,  ∂H_pre = ∂H ⊙ keep / (1-p)     tile_dots      [T, r]
//   ∂x = G + ∂H_pre W_A                                                    tile_combine
//   partial ∂W_A += ∂H_preᵀ X,  partial ∂b_A += Σ_t ∂H_pre                 tile_accumulate
//   Q_k[j] = Σ_t H_aug[t, k, j] G_k[t]   (H_aug: H with a constant-1 slot)  tile_accumulate [S, D]
//   partial ∂UP_e += coef[b,e] Q  (∂M_e and ∂b_U),  tile term of ∂w: UP_e · Q (E·S rows per tile)
// Then: ∂W_A, ∂M, ∂b_U, ∂b_A = Σ chunks; ∂w[b, e] = s Σ tile terms of sample b.
#include <ATen/Parallel.h>

#include "cpu/cpu_kernel_utils.h"
#include "cpu/tile_kernels.h"
#include "philox.h"

namespace mlan {
namespace cpu {
namespace {

constexpr int64_t kChunkTokens = 128;  // tokens per chunk, at least (while chunks < kMaxChunks)
constexpr int64_t kMaxChunks = 32;     // bounds the partial buffers' memory
constexpr int64_t kTileTokens = 16;    // tokens (of one sample) sharing each weight load

int64_t chunk_count(int64_t tokens) {
  return std::max<int64_t>(1, std::min(kMaxChunks, (tokens + kChunkTokens - 1) / kChunkTokens));
}

// Workspace (acc_t): per chunk [(r + E*S) partial gradient rows, row_stride apart | r for ∂b_A],
// then the ∂w terms [N, E] (a tile's term at its first token, zeros at the others).
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
  const int64_t slots, per_group, expert_size;  // expert_size = S * row_stride
  const bool in_place;                           // rows_in_place: no gather/scatter buffers
  const uint64_t seed;                           // the dropout key, read once (host memory)
  acc_t* const workspace;

  explicit BackwardKernel(const BackwardArgs& a)
      : args(a), shape(a.shape), layout(a.shape, lanes), columns(layout.columns),
        weights(a.shape, layout.columns, static_cast<const acc_t*>(a.down_weight),
                static_cast<const acc_t*>(a.up_weight), static_cast<const acc_t*>(a.up_bias)),
        slots(a.shape.slots()), per_group(a.shape.rank_per_group()),
        expert_size(a.shape.slots() * layout.columns.row_stride),
        in_place(rows_in_place<scalar_t, acc_t>(layout.columns)), seed(a.dropout.key()),
        workspace(static_cast<acc_t*>(a.workspace)) {}

  // Per-task scratch: the tile's padded rows of x, grad_y and grad_x [T, row_stride], its ∂H_pre
  // [T, r] and H_aug [T, g, S], the tile's Q [S, row_stride], the sample's U_b [S, row_stride].
  struct Tile {
    std::vector<acc_t> x, g, gx, grad_hidden, h_aug, q, combined, terms;
    int64_t sample = -1;  // whose U_b `combined` holds
    explicit Tile(const BackwardKernel& k)
        : x(k.in_place ? 0 : kTileTokens * k.columns.row_stride, acc_t(0)), g(x.size(), acc_t(0)),
          gx(x.size()),
          grad_hidden(kTileTokens * k.shape.rank), h_aug(kTileTokens * k.shape.groups * k.slots),
          q(k.expert_size, acc_t(0)), combined(k.expert_size), terms(k.shape.experts) {}
  };

  // The tile's `count` tokens from n0 (all of sample b): gather, ∂H_pre, ∂x, partial ∂W_A and
  // ∂b_A, Q, then partial ∂UP_e += coef[b,e] Q and the ∂w row terms UP_e · Q.
  void run_tile(int64_t n0, int64_t count, Tile& tile, acc_t* partial) const {
    const int64_t rank = shape.rank, experts = shape.experts, groups = shape.groups;
    const int64_t stride = columns.row_stride, group_stride = columns.group_stride;
    const int64_t width = columns.width, sample = n0 / shape.length;
    const acc_t* coef = static_cast<const acc_t*>(args.coef) + sample * experts;
    const auto* x = static_cast<const scalar_t*>(args.x) + args.x_strides.offset(n0, shape.length);
    const auto* grad_y =
        static_cast<const scalar_t*>(args.grad_y) + args.grad_y_strides.offset(n0, shape.length);
    auto* grad_x = static_cast<scalar_t*>(args.grad_x) + n0 * shape.dim;
    const acc_t *x_rows = tile.x.data(), *g_rows = tile.g.data();
    acc_t* gx_rows = tile.gx.data();
    int64_t x_stride = stride, g_stride = stride, gx_stride = stride;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (in_place) {
        x_rows = x, x_stride = args.x_strides.token, g_rows = grad_y, g_stride = args.grad_y_strides.token;
        gx_rows = grad_x, gx_stride = shape.dim;
      }
    }
    if (!in_place) {
      for (int64_t t = 0; t < count; ++t) {
        gather_row(x + t * args.x_strides.token, columns, tile.x.data() + t * stride);
        gather_row(grad_y + t * args.grad_y_strides.token, columns, tile.g.data() + t * stride);
      }
    }
    if (sample != tile.sample) {
      combine_rows<acc_t>(nullptr, coef, 1, weights.up.data(), expert_size, experts, expert_size,
                          tile.combined.data());
      tile.sample = sample;
    }
    acc_t* grad_hidden = tile.grad_hidden.data();
    for (int64_t k = 0; k < groups; ++k)  // ∂H[t, k r/g + j] = G_k[t] · U_b[j]_k
      tile_dots(g_rows + k * group_stride, g_stride, count, tile.combined.data() + k * group_stride,
                stride, per_group, group_stride, grad_hidden + k * per_group, rank);
    acc_t* partial_bias = partial + layout.gradient_rows * stride;
    const acc_t keep_scale = static_cast<acc_t>(args.dropout.keep_scale);
    const acc_t* hidden = static_cast<const acc_t*>(args.hidden) + n0 * rank;
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t i = 0; i < rank; ++i) {
        acc_t& value = grad_hidden[t * rank + i];
        if (args.dropout.enabled)
          value = dropout_keep(seed, args.dropout.threshold, n0 + t, rank, i) ? value * keep_scale
                                                                              : acc_t(0);
        partial_bias[i] += value;
      }
      for (int64_t k = 0; k < groups; ++k) {
        acc_t* slot = tile.h_aug.data() + (t * groups + k) * slots;
        std::copy(hidden + t * rank + k * per_group, hidden + t * rank + (k + 1) * per_group, slot);
        slot[per_group] = acc_t(1);
      }
    }
    // ∂x = G + ∂H_pre W_A
    tile_combine(g_rows, g_stride, grad_hidden, rank, count, weights.down.data(), stride, rank, width,
                 gx_rows, gx_stride);
    if (!in_place)
      for (int64_t t = 0; t < count; ++t)
        scatter_row(tile.gx.data() + t * stride, columns, grad_x + t * shape.dim);
    // ∂W_A += ∂H_preᵀ X;  Q_k[j] = Σ_t H_aug[t, k, j] G_k[t]
    tile_accumulate(partial, stride, rank, grad_hidden, rank, x_rows, x_stride, count, width);
    std::fill(tile.q.begin(), tile.q.end(), acc_t(0));
    for (int64_t k = 0; k < groups; ++k)
      tile_accumulate(tile.q.data() + k * group_stride, stride, slots, tile.h_aug.data() + k * slots,
                      groups * slots, g_rows + k * group_stride, g_stride, count, group_stride);
    acc_t* partial_up = partial + rank * stride;
    for (int64_t e = 0; e < experts; ++e)
      combine_rows(partial_up + e * expert_size, coef + e, 1, tile.q.data(), expert_size, 1,
                   expert_size, partial_up + e * expert_size);
    tile_dots(tile.q.data(), 0, 1, weights.up.data(), expert_size, experts, expert_size,
              tile.terms.data(), experts);
    acc_t* row_terms = workspace + layout.row_terms_offset + n0 * experts;
    std::fill(row_terms, row_terms + count * experts, acc_t(0));
    std::copy(tile.terms.begin(), tile.terms.end(), row_terms);
  }

  // Tiles never straddle a sample (U_b and coef are per sample), nor the chunk's end.
  void run_chunk(int64_t chunk, Tile& tile) const {
    acc_t* partial = workspace + chunk * layout.partial_size;
    std::fill(partial, partial + layout.partial_size, acc_t(0));
    const int64_t tokens = shape.tokens();
    const int64_t begin = chunk * tokens / layout.chunks, end = (chunk + 1) * tokens / layout.chunks;
    for (int64_t n0 = begin; n0 < end;) {
      const int64_t sample_end = (n0 / shape.length + 1) * shape.length;
      const int64_t count = std::min({kTileTokens, end - n0, sample_end - n0});
      run_tile(n0, count, tile, partial);
      n0 += count;
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
    advise_huge_pages(args.grad_x, shape.tokens() * shape.dim * static_cast<int64_t>(sizeof(scalar_t)));
    advise_huge_pages(workspace, layout.total * static_cast<int64_t>(sizeof(acc_t)));
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
