// Fused MM-Adapter forward on CPU, a tile of token rows at a time: each row of x is read once,
// y written once, and each weight chunk is loaded once per tile (tile_kernels.h).
//
// Per tile of up to kTileTokens tokens of one sample b (rows of D columns, padded per group,
// see cpu_kernel_utils.h: fp32/fp64 rows of chunk-aligned groups are used in place, others are
// gathered into one acc_t buffer and y scattered back from it):
//   H      = dropout(X W_Aᵀ + b_A)                       [T, r]   tile_dots
//   U_b    = Σ_e coef[b, e] UP_e                         [S, row_stride], once per sample per task
//   Y[t,d] = X[t,d] + Σ_j h_aug[t, k(d), j] U_b[j, d]    tile_combine, in place in the buffer,
//            h_aug = (h[k r/g ... k r/g + r/g-1], 1)
// Token ranges run in parallel (at::parallel_for); nothing is reduced across tokens and a
// token's arithmetic does not depend on its tile, so the output is independent of the thread count.
#include <ATen/Parallel.h>

#include "cpu/cpu_kernel_utils.h"
#include "cpu/tile_kernels.h"
#include "philox.h"

namespace mlan {
namespace cpu {
namespace {

constexpr int64_t kForwardGrainTokens = 16;  // smallest token range worth a parallel task
constexpr int64_t kTileTokens = 8;           // token rows sharing each weight load

template <typename scalar_t, typename acc_t>
void forward_kernel(const ForwardArgs& args) {
  const AdapterShape& shape = args.shape;
  const PaddedColumns columns(shape, kLanes<acc_t>);
  const PaddedWeights<acc_t> weights(shape, columns, static_cast<const acc_t*>(args.down_weight),
                                     static_cast<const acc_t*>(args.up_weight),
                                     static_cast<const acc_t*>(args.up_bias));
  const auto* x = static_cast<const scalar_t*>(args.x);
  const auto* down_bias = static_cast<const acc_t*>(args.down_bias);
  const auto* coef = static_cast<const acc_t*>(args.coef);
  auto* y = static_cast<scalar_t*>(args.y);
  auto* hidden = static_cast<acc_t*>(args.hidden);
  const int64_t stride = columns.row_stride, slots = shape.slots(), rank = shape.rank;
  const int64_t per_group = shape.rank_per_group(), group_stride = columns.group_stride;
  const uint64_t seed = args.dropout.key();  // host memory: the glue passes CPU seeds only
  const acc_t keep_scale = static_cast<acc_t>(args.dropout.keep_scale);

  const bool in_place = rows_in_place<scalar_t, acc_t>(columns);
  advise_huge_pages(y, shape.tokens() * shape.dim * static_cast<int64_t>(sizeof(scalar_t)));

  at::parallel_for(0, shape.tokens(), kForwardGrainTokens, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(in_place ? 0 : kTileTokens * stride, acc_t(0)), combined(slots * stride);
    std::vector<acc_t> h_aug(kTileTokens * slots);
    int64_t cached_sample = -1;
    for (int64_t n0 = begin; n0 < end;) {  // tiles of one sample (its rows are token-strided)
      const int64_t count = std::min({kTileTokens, end - n0, (n0 / shape.length + 1) * shape.length - n0});
      const int64_t sample = args.single_modality ? 0 : n0 / shape.length;
      const scalar_t* x_rows = x + args.x_strides.offset(n0, shape.length);
      const acc_t* in = rows.data();
      acc_t* out = rows.data();
      int64_t in_stride = stride, out_stride = stride;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (in_place) in = x_rows, in_stride = args.x_strides.token, out = y + n0 * shape.dim, out_stride = shape.dim;
      }
      if (!in_place)
        for (int64_t t = 0; t < count; ++t)
          gather_row(x_rows + t * args.x_strides.token, columns, rows.data() + t * stride);
      acc_t* h = hidden + n0 * rank;
      tile_dots(in, in_stride, count, weights.down.data(), stride, rank, columns.width, h, rank);
      for (int64_t t = 0; t < count; ++t) {
        for (int64_t i = 0; i < rank; ++i) {
          acc_t value = h[t * rank + i] + down_bias[i];
          if (args.dropout.enabled)
            value = dropout_keep(seed, args.dropout.threshold, n0 + t, rank, i) ? value * keep_scale
                                                                                : acc_t(0);
          h[t * rank + i] = value;
        }
      }
      if (sample != cached_sample) {  // U_b: the experts' slots mixed with this sample's coef
        combine_rows<acc_t>(nullptr, coef + sample * shape.experts, 1, weights.up.data(),
                            slots * stride, shape.experts, slots * stride, combined.data());
        cached_sample = sample;
      }
      for (int64_t k = 0; k < shape.groups; ++k) {
        for (int64_t t = 0; t < count; ++t) {
          std::copy(h + t * rank + k * per_group, h + t * rank + (k + 1) * per_group,
                    h_aug.begin() + t * slots);
          h_aug[t * slots + per_group] = acc_t(1);
        }
        const int64_t column = k * group_stride;
        tile_combine(in + column, in_stride, h_aug.data(), slots, count, combined.data() + column,
                     stride, slots, group_stride, out + column, out_stride);
      }
      if (!in_place)
        for (int64_t t = 0; t < count; ++t)
          scatter_row(rows.data() + t * stride, columns, y + (n0 + t) * shape.dim);
      n0 += count;
    }
  });
}

}  // namespace
}  // namespace cpu

void forward_cpu(const ForwardArgs& args) {
  cpu::dispatch_dtype(args.dtype, [&](auto scalar, auto acc) {
    cpu::forward_kernel<decltype(scalar), decltype(acc)>(args);
  });
}

}  // namespace mlan
