// Fused MM-Adapter forward on CPU: each token row of x is read once, y written once.
//
// Per token n of sample b (rows of D columns, padded per group, see cpu_kernel_utils.h):
//   h      = dropout(x W_Aᵀ + b_A)                       [r]   r dot products over the row
//   U_b    = Σ_e coef[b, e] UP_e                         [S, row_stride], once per sample per task
//   y[d]   = x[d] + Σ_j h_aug[k(d), j] U_b[j, d]         h_aug = (h[k r/g ... k r/g + r/g-1], 1)
// Token ranges run in parallel (at::parallel_for); nothing is reduced across tokens, so the
// output is independent of the thread count.
#include <ATen/Parallel.h>

#include "cpu/cpu_kernel_utils.h"
#include "philox.h"

namespace mlan {
namespace cpu {
namespace {

constexpr int64_t kForwardGrainTokens = 16;  // smallest token range worth a parallel task

// hidden[0, r) = dropout(x_row · W_Aᵀ + b_A) of token `token`; x_row is padded; seed: the
// dropout key (dropout.key(), read once per call).
template <typename acc_t>
void hidden_units(const acc_t* x_row, const acc_t* down, const acc_t* down_bias,
                  const AdapterShape& shape, const PaddedColumns& columns,
                  const DropoutConfig& dropout, uint64_t seed, int64_t token, acc_t* hidden) {
  dot_rows(x_row, down, columns.row_stride, shape.rank, columns.width, hidden);
  const acc_t keep_scale = static_cast<acc_t>(dropout.keep_scale);
  for (int64_t i = 0; i < shape.rank; ++i) {
    hidden[i] += down_bias[i];
    if (dropout.enabled)
      hidden[i] = dropout_keep(seed, dropout.threshold, token, shape.rank, i)
                      ? hidden[i] * keep_scale : acc_t(0);
  }
}

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
  const int64_t width = columns.width, stride = columns.row_stride, slots = shape.slots();
  const int64_t per_group = shape.rank_per_group();
  const uint64_t seed = args.dropout.key();  // host memory: the glue passes CPU seeds only

  at::parallel_for(0, shape.tokens(), kForwardGrainTokens, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_row(width), y_row(width), combined(slots * stride), h_aug(slots);
    int64_t cached_sample = -1;
    for (int64_t n = begin; n < end; ++n) {
      gather_row(x + args.x_strides.offset(n, shape.length), columns, x_row.data());
      acc_t* h = hidden + n * shape.rank;
      hidden_units(x_row.data(), weights.down.data(), down_bias, shape, columns, args.dropout,
                   seed, n, h);

      const int64_t sample = args.single_modality ? 0 : n / shape.length;
      if (sample != cached_sample) {  // U_b: the experts' slots mixed with this sample's coef
        combine_rows<acc_t>(nullptr, coef + sample * shape.experts, 1, weights.up.data(),
                            slots * stride, shape.experts, slots * stride, combined.data());
        cached_sample = sample;
      }
      for (int64_t k = 0; k < shape.groups; ++k) {
        std::copy(h + k * per_group, h + (k + 1) * per_group, h_aug.begin());
        h_aug[per_group] = acc_t(1);
        const int64_t base = k * columns.group_stride;
        combine_rows(x_row.data() + base, h_aug.data(), 1, combined.data() + base, stride, slots,
                     columns.group_stride, y_row.data() + base);
      }
      scatter_row(y_row.data(), columns, y + n * shape.dim);
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
