// Register-blocked micro-kernels over a tile of token rows: each weight (or partial-gradient)
// chunk is loaded once per tile instead of once per token, as GEMM micro-kernels do.
//   tile_dots        out[t, q] = a_t · rows_q                   (x W_Aᵀ, ∂y U_bᵀ)
//   tile_combine     out_t = base_t + Σ_q coeff[t, q] rows_q    (y, ∂x)
//   tile_accumulate  rows_q += Σ_t coeff[t, q] a_t              (∂W_A, Σ_t H_augᵀ ∂y)
// A chunk is one Wide vector of kLanes acc_t (64 bytes: one zmm register on AVX-512, two ymm
// on AVX2); every count is a whole number of chunks (the padded layout, cpu_kernel_utils.h).
// The arithmetic of each output depends only on its own inputs and on the tile's token count
// in tile_accumulate: never on how tokens or rows are blocked into registers, so a token's
// results are the same in a full tile, a tail tile, or with any number of threads.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/simd.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mlan::cpu {

template <typename acc_t>
struct WideOf {
  typedef acc_t type __attribute__((vector_size(64)));
};
template <typename acc_t>
using Wide = typename WideOf<acc_t>::type;
static_assert(sizeof(Wide<float>) == kLanes<float> * sizeof(float), "a Wide vector is one chunk");

template <typename acc_t>
MLAN_ALWAYS_INLINE Wide<acc_t> load_wide(const acc_t* source) {
  Wide<acc_t> value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

template <typename acc_t>
MLAN_ALWAYS_INLINE void store_wide(acc_t* target, Wide<acc_t> value) {
  std::memcpy(target, &value, sizeof(value));
}

// The lanes summed as a fixed tree (halves, then quarters, ...).
template <typename acc_t>
MLAN_ALWAYS_INLINE acc_t wide_sum(Wide<acc_t> value) {
  constexpr int lanes = kLanes<acc_t>;
  acc_t part[lanes];
  std::memcpy(part, &value, sizeof(part));
  for (int width = lanes / 2; width >= 1; width /= 2)
    for (int v = 0; v < width; ++v) part[v] += part[v + width];
  return part[0];
}

// kTokens x kRows block of tile_dots.
template <int kTokens, int kRows, typename acc_t>
MLAN_ALWAYS_INLINE void dots_block(const acc_t* a, int64_t a_stride, const acc_t* rows,
                                   int64_t row_stride, int64_t count, acc_t* out,
                                   int64_t out_stride) {
  Wide<acc_t> sums[kTokens][kRows] = {};
  for (int64_t c = 0; c < count; c += kLanes<acc_t>) {
    Wide<acc_t> token[kTokens];
    for (int t = 0; t < kTokens; ++t) token[t] = load_wide(a + t * a_stride + c);
    for (int q = 0; q < kRows; ++q) {
      const Wide<acc_t> row = load_wide(rows + q * row_stride + c);
      for (int t = 0; t < kTokens; ++t) sums[t][q] += token[t] * row;
    }
  }
  for (int t = 0; t < kTokens; ++t)
    for (int q = 0; q < kRows; ++q) out[t * out_stride + q] = wide_sum<acc_t>(sums[t][q]);
}

template <int kTokens, typename acc_t>
MLAN_ALWAYS_INLINE void dots_tokens(const acc_t* a, int64_t a_stride, const acc_t* rows,
                                    int64_t row_stride, int64_t num_rows, int64_t count,
                                    acc_t* out, int64_t out_stride) {
  int64_t q = 0;
  for (; q + 4 <= num_rows; q += 4)
    dots_block<kTokens, 4>(a, a_stride, rows + q * row_stride, row_stride, count, out + q, out_stride);
  for (; q < num_rows; ++q)
    dots_block<kTokens, 1>(a, a_stride, rows + q * row_stride, row_stride, count, out + q, out_stride);
}

// out[t * out_stride + q] = Σ_{c < count} a[t * a_stride + c] * rows[q * row_stride + c]
// for t < tokens, q < num_rows; blocks of 4 tokens x 4 rows.
template <typename acc_t>
MLAN_CPU_CLONES void tile_dots(const acc_t* a, int64_t a_stride, int64_t tokens, const acc_t* rows,
                               int64_t row_stride, int64_t num_rows, int64_t count, acc_t* out,
                               int64_t out_stride) {
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4)
    dots_tokens<4>(a + t * a_stride, a_stride, rows, row_stride, num_rows, count, out + t * out_stride,
                   out_stride);
  for (; t < tokens; ++t)
    dots_tokens<1>(a + t * a_stride, a_stride, rows, row_stride, num_rows, count, out + t * out_stride,
                   out_stride);
}

template <int kTokens, typename acc_t>
MLAN_ALWAYS_INLINE void combine_block(const acc_t* base, int64_t base_stride, const acc_t* coeffs,
                                      int64_t coeff_stride, const acc_t* rows, int64_t row_stride,
                                      int64_t num_rows, int64_t count, acc_t* out, int64_t stride) {
  for (int64_t c = 0; c < count; c += kLanes<acc_t>) {
    Wide<acc_t> sums[kTokens];
    for (int t = 0; t < kTokens; ++t) sums[t] = load_wide(base + t * base_stride + c);
    for (int64_t q = 0; q < num_rows; ++q) {
      const Wide<acc_t> row = load_wide(rows + q * row_stride + c);
      for (int t = 0; t < kTokens; ++t) sums[t] += coeffs[t * coeff_stride + q] * row;
    }
    for (int t = 0; t < kTokens; ++t) store_wide(out + t * stride + c, sums[t]);
  }
}

// out[t * stride + c] = base[t * base_stride + c] + Σ_{q < num_rows} coeffs[t * coeff_stride + q]
// * rows[q * row_stride + c], q in order, for t < tokens, c < count; out may alias base.
template <typename acc_t>
MLAN_CPU_CLONES void tile_combine(const acc_t* base, int64_t base_stride, const acc_t* coeffs,
                                  int64_t coeff_stride, int64_t tokens, const acc_t* rows,
                                  int64_t row_stride, int64_t num_rows, int64_t count, acc_t* out,
                                  int64_t stride) {
  int64_t t = 0;
  for (; t + 8 <= tokens; t += 8)
    combine_block<8>(base + t * base_stride, base_stride, coeffs + t * coeff_stride, coeff_stride,
                     rows, row_stride, num_rows, count, out + t * stride, stride);
  for (; t < tokens; ++t)
    combine_block<1>(base + t * base_stride, base_stride, coeffs + t * coeff_stride, coeff_stride,
                     rows, row_stride, num_rows, count, out + t * stride, stride);
}

// kRows rows of tile_accumulate; even and odd tokens in separate sums (2·kRows FMA chains).
template <int kRows, typename acc_t>
MLAN_ALWAYS_INLINE void accumulate_block(acc_t* rows, int64_t row_stride, const acc_t* coeffs,
                                         int64_t coeff_stride, const acc_t* a, int64_t a_stride,
                                         int64_t tokens, int64_t count) {
  for (int64_t c = 0; c < count; c += kLanes<acc_t>) {
    Wide<acc_t> even[kRows] = {}, odd[kRows] = {};
    int64_t t = 0;
    for (; t + 2 <= tokens; t += 2) {
      const Wide<acc_t> first = load_wide(a + t * a_stride + c);
      const Wide<acc_t> second = load_wide(a + (t + 1) * a_stride + c);
      for (int q = 0; q < kRows; ++q) {
        even[q] += coeffs[t * coeff_stride + q] * first;
        odd[q] += coeffs[(t + 1) * coeff_stride + q] * second;
      }
    }
    if (t < tokens) {
      const Wide<acc_t> last = load_wide(a + t * a_stride + c);
      for (int q = 0; q < kRows; ++q) even[q] += coeffs[t * coeff_stride + q] * last;
    }
    for (int q = 0; q < kRows; ++q) {
      acc_t* row = rows + q * row_stride + c;
      store_wide(row, load_wide(row) + (even[q] + odd[q]));
    }
  }
}

// rows[q * row_stride + c] += Σ_{t < tokens} coeffs[t * coeff_stride + q] * a[t * a_stride + c]
// for q < num_rows, c < count; rows in blocks of 4.
template <typename acc_t>
MLAN_CPU_CLONES void tile_accumulate(acc_t* rows, int64_t row_stride, int64_t num_rows,
                                     const acc_t* coeffs, int64_t coeff_stride, const acc_t* a,
                                     int64_t a_stride, int64_t tokens, int64_t count) {
  int64_t q = 0;
  for (; q + 4 <= num_rows; q += 4)
    accumulate_block<4>(rows + q * row_stride, row_stride, coeffs + q, coeff_stride, a, a_stride,
                        tokens, count);
  for (; q < num_rows; ++q)
    accumulate_block<1>(rows + q * row_stride, row_stride, coeffs + q, coeff_stride, a, a_stride,
                        tokens, count);
}

}  // namespace mlan::cpu

#pragma GCC diagnostic pop
