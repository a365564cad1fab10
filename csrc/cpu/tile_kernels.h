// Register-blocked micro-kernels over a tile of token rows: each weight (or partial-gradient)
// chunk is loaded once per tile instead of once per token, as GEMM micro-kernels do.
//   tile_dots        out[t, q] = a_t · rows_q                   (x W_Aᵀ, ∂y U_bᵀ)
//   tile_combine     out_t = base_t + Σ_q coeff[t, q] rows_q    (y, ∂x)
//   tile_accumulate  rows_q += Σ_t coeff[t, q] a_t              (∂W_A, Σ_t H_augᵀ ∂y)
// A chunk is kLanes acc_t (64 bytes: one zmm register on AVX-512, a Pair of ymm registers on
// AVX2); every count is a whole number of chunks (the padded layout, cpu_kernel_utils.h).
// The arithmetic of each output depends only on its own inputs and on the tile's token count
// in tile_accumulate: never on how tokens or rows are blocked into registers, so a token's
// results are the same in a full tile, a tail tile, or with any number of threads.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

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

// Whether the running clone has 32 vector registers of a whole chunk each (AVX-512: the
// x86-64-v4 clone, which the loader picks exactly when the CPU has AVX-512F). Elsewhere a chunk
// takes two registers (AVX2) or four (SSE), so the micro-kernels hold it as a Pair and use
// blocks half as wide; neither changes the arithmetic of an output, so both give the same bits.
inline bool wide_registers() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MLAN_NO_TARGET_CLONES)
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// A chunk held as two 32-byte vectors, for the clones without AVX-512: there a 64-byte GCC
// vector is no register type and would live on the stack. Lane v of a Pair is lane v of the
// Wide (low: 0-7, high: 8-15 for float), so both give the same bits.
template <typename acc_t>
struct Pair {
  Vec<acc_t> low, high;
};
template <typename acc_t>
MLAN_ALWAYS_INLINE Pair<acc_t> operator*(Pair<acc_t> a, Pair<acc_t> b) {
  return {a.low * b.low, a.high * b.high};
}
template <typename acc_t>
MLAN_ALWAYS_INLINE Pair<acc_t> operator*(acc_t scalar, Pair<acc_t> b) {
  return {scalar * b.low, scalar * b.high};
}
template <typename acc_t>
MLAN_ALWAYS_INLINE Pair<acc_t> operator+(Pair<acc_t> a, Pair<acc_t> b) {
  return {a.low + b.low, a.high + b.high};
}
template <typename acc_t>
MLAN_ALWAYS_INLINE Pair<acc_t>& operator+=(Pair<acc_t>& a, Pair<acc_t> b) {
  a.low += b.low;
  a.high += b.high;
  return a;
}

// One chunk: a Wide vector (kWide: the AVX-512 clone) or a Pair.
template <bool kWide, typename acc_t>
using Chunk = std::conditional_t<kWide, Wide<acc_t>, Pair<acc_t>>;

template <bool kWide, typename acc_t>
MLAN_ALWAYS_INLINE Chunk<kWide, acc_t> load_chunk(const acc_t* source) {
  if constexpr (kWide) {
    Wide<acc_t> value;
    std::memcpy(&value, source, sizeof(value));
    return value;
  } else {
    return Pair<acc_t>{load_vec(source), load_vec(source + kVecLanes<acc_t>)};
  }
}

template <bool kWide, typename acc_t>
MLAN_ALWAYS_INLINE void store_chunk(acc_t* target, Chunk<kWide, acc_t> value) {
  if constexpr (kWide) {
    std::memcpy(target, &value, sizeof(value));
  } else {
    store_vec(target, value.low);
    store_vec(target + kVecLanes<acc_t>, value.high);
  }
}

// The chunk's lanes summed as a fixed tree (halves, then quarters, ...).
template <bool kWide, typename acc_t>
MLAN_ALWAYS_INLINE acc_t chunk_sum(Chunk<kWide, acc_t> value) {
  constexpr int half = kVecLanes<acc_t>;
  acc_t part[2 * half];
  std::memcpy(part, &value, sizeof(part));
  for (int width = half; width >= 1; width /= 2)
    for (int v = 0; v < width; ++v) part[v] += part[v + width];
  return part[0];
}

// kTokens x kRows block of tile_dots.
template <bool kWide, int kTokens, int kRows, typename acc_t>
MLAN_ALWAYS_INLINE void dots_block(const acc_t* a, int64_t a_stride, const acc_t* rows,
                                   int64_t row_stride, int64_t count, acc_t* out,
                                   int64_t out_stride) {
  Chunk<kWide, acc_t> sums[kTokens][kRows] = {};
  for (int64_t c = 0; c < count; c += kLanes<acc_t>) {
    Chunk<kWide, acc_t> token[kTokens];
    for (int t = 0; t < kTokens; ++t) token[t] = load_chunk<kWide>(a + t * a_stride + c);
    for (int q = 0; q < kRows; ++q) {
      const Chunk<kWide, acc_t> row = load_chunk<kWide>(rows + q * row_stride + c);
      for (int t = 0; t < kTokens; ++t) sums[t][q] += token[t] * row;
    }
  }
  for (int t = 0; t < kTokens; ++t)
    for (int q = 0; q < kRows; ++q) out[t * out_stride + q] = chunk_sum<kWide, acc_t>(sums[t][q]);
}

template <bool kWide, int kTokens, int kRows, typename acc_t>
MLAN_ALWAYS_INLINE void dots_tokens(const acc_t* a, int64_t a_stride, const acc_t* rows,
                                    int64_t row_stride, int64_t num_rows, int64_t count,
                                    acc_t* out, int64_t out_stride) {
  int64_t q = 0;
  for (; q + kRows <= num_rows; q += kRows)
    dots_block<kWide, kTokens, kRows>(a, a_stride, rows + q * row_stride, row_stride, count, out + q, out_stride);
  for (; q < num_rows; ++q)
    dots_block<kWide, kTokens, 1>(a, a_stride, rows + q * row_stride, row_stride, count, out + q, out_stride);
}

template <bool kWide, int kBlock, typename acc_t>
MLAN_ALWAYS_INLINE void dots_tiles(const acc_t* a, int64_t a_stride, int64_t tokens, const acc_t* rows,
                                   int64_t row_stride, int64_t num_rows, int64_t count, acc_t* out,
                                   int64_t out_stride) {
  int64_t t = 0;
  for (; t + kBlock <= tokens; t += kBlock)
    dots_tokens<kWide, kBlock, kBlock>(a + t * a_stride, a_stride, rows, row_stride, num_rows, count,
                                out + t * out_stride, out_stride);
  for (; t < tokens; ++t)
    dots_tokens<kWide, 1, kBlock>(a + t * a_stride, a_stride, rows, row_stride, num_rows, count,
                           out + t * out_stride, out_stride);
}

// out[t * out_stride + q] = Σ_{c < count} a[t * a_stride + c] * rows[q * row_stride + c]
// for t < tokens, q < num_rows; blocks of 4 tokens x 4 rows (2 x 2 without wide_registers).
template <typename acc_t>
MLAN_CPU_CLONES void tile_dots(const acc_t* a, int64_t a_stride, int64_t tokens, const acc_t* rows,
                               int64_t row_stride, int64_t num_rows, int64_t count, acc_t* out,
                               int64_t out_stride) {
  if (wide_registers())
    dots_tiles<true, 4>(a, a_stride, tokens, rows, row_stride, num_rows, count, out, out_stride);
  else
    dots_tiles<false, 2>(a, a_stride, tokens, rows, row_stride, num_rows, count, out, out_stride);
}

template <bool kWide, int kTokens, typename acc_t>
MLAN_ALWAYS_INLINE void combine_block(const acc_t* base, int64_t base_stride, const acc_t* coeffs,
                                      int64_t coeff_stride, const acc_t* rows, int64_t row_stride,
                                      int64_t num_rows, int64_t count, acc_t* out, int64_t stride) {
  for (int64_t c = 0; c < count; c += kLanes<acc_t>) {
    Chunk<kWide, acc_t> sums[kTokens];
    for (int t = 0; t < kTokens; ++t) sums[t] = load_chunk<kWide>(base + t * base_stride + c);
    for (int64_t q = 0; q < num_rows; ++q) {
      const Chunk<kWide, acc_t> row = load_chunk<kWide>(rows + q * row_stride + c);
      for (int t = 0; t < kTokens; ++t) sums[t] += coeffs[t * coeff_stride + q] * row;
    }
    for (int t = 0; t < kTokens; ++t) store_chunk<kWide, acc_t>(out + t * stride + c, sums[t]);
  }
}

template <bool kWide, int kBlock, typename acc_t>
MLAN_ALWAYS_INLINE void combine_tiles(const acc_t* base, int64_t base_stride, const acc_t* coeffs,
                                      int64_t coeff_stride, int64_t tokens, const acc_t* rows,
                                      int64_t row_stride, int64_t num_rows, int64_t count, acc_t* out,
                                      int64_t stride) {
  int64_t t = 0;
  for (; t + kBlock <= tokens; t += kBlock)
    combine_block<kWide, kBlock>(base + t * base_stride, base_stride, coeffs + t * coeff_stride, coeff_stride,
                     rows, row_stride, num_rows, count, out + t * stride, stride);
  for (; t < tokens; ++t)
    combine_block<kWide, 1>(base + t * base_stride, base_stride, coeffs + t * coeff_stride, coeff_stride,
                     rows, row_stride, num_rows, count, out + t * stride, stride);
}

// out[t * stride + c] = base[t * base_stride + c] + Σ_{q < num_rows} coeffs[t * coeff_stride + q]
// * rows[q * row_stride + c], q in order, for t < tokens, c < count; out may alias base. Token
// blocks of 8 (4 without wide_registers).
template <typename acc_t>
MLAN_CPU_CLONES void tile_combine(const acc_t* base, int64_t base_stride, const acc_t* coeffs,
                                  int64_t coeff_stride, int64_t tokens, const acc_t* rows,
                                  int64_t row_stride, int64_t num_rows, int64_t count, acc_t* out,
                                  int64_t stride) {
  if (wide_registers())
    combine_tiles<true, 8>(base, base_stride, coeffs, coeff_stride, tokens, rows, row_stride, num_rows,
                     count, out, stride);
  else
    combine_tiles<false, 4>(base, base_stride, coeffs, coeff_stride, tokens, rows, row_stride, num_rows,
                     count, out, stride);
}

// kRows rows of tile_accumulate; even and odd tokens in separate sums (2·kRows FMA chains).
template <bool kWide, int kRows, typename acc_t>
MLAN_ALWAYS_INLINE void accumulate_block(acc_t* rows, int64_t row_stride, const acc_t* coeffs,
                                         int64_t coeff_stride, const acc_t* a, int64_t a_stride,
                                         int64_t tokens, int64_t count) {
  for (int64_t c = 0; c < count; c += kLanes<acc_t>) {
    Chunk<kWide, acc_t> even[kRows] = {}, odd[kRows] = {};
    int64_t t = 0;
    for (; t + 2 <= tokens; t += 2) {
      const Chunk<kWide, acc_t> first = load_chunk<kWide>(a + t * a_stride + c);
      const Chunk<kWide, acc_t> second = load_chunk<kWide>(a + (t + 1) * a_stride + c);
      for (int q = 0; q < kRows; ++q) {
        even[q] += coeffs[t * coeff_stride + q] * first;
        odd[q] += coeffs[(t + 1) * coeff_stride + q] * second;
      }
    }
    if (t < tokens) {
      const Chunk<kWide, acc_t> last = load_chunk<kWide>(a + t * a_stride + c);
      for (int q = 0; q < kRows; ++q) even[q] += coeffs[t * coeff_stride + q] * last;
    }
    for (int q = 0; q < kRows; ++q) {
      acc_t* row = rows + q * row_stride + c;
      store_chunk<kWide, acc_t>(row, load_chunk<kWide>(row) + (even[q] + odd[q]));
    }
  }
}

template <bool kWide, int kBlock, typename acc_t>
MLAN_ALWAYS_INLINE void accumulate_tiles(acc_t* rows, int64_t row_stride, int64_t num_rows,
                                         const acc_t* coeffs, int64_t coeff_stride, const acc_t* a,
                                         int64_t a_stride, int64_t tokens, int64_t count) {
  int64_t q = 0;
  for (; q + kBlock <= num_rows; q += kBlock)
    accumulate_block<kWide, kBlock>(rows + q * row_stride, row_stride, coeffs + q, coeff_stride, a, a_stride,
                        tokens, count);
  for (; q < num_rows; ++q)
    accumulate_block<kWide, 1>(rows + q * row_stride, row_stride, coeffs + q, coeff_stride, a, a_stride,
                        tokens, count);
}

// rows[q * row_stride + c] += Σ_{t < tokens} coeffs[t * coeff_stride + q] * a[t * a_stride + c]
// for q < num_rows, c < count; rows in blocks of 4 (2 without wide_registers).
template <typename acc_t>
MLAN_CPU_CLONES void tile_accumulate(acc_t* rows, int64_t row_stride, int64_t num_rows,
                                     const acc_t* coeffs, int64_t coeff_stride, const acc_t* a,
                                     int64_t a_stride, int64_t tokens, int64_t count) {
  if (wide_registers())
    accumulate_tiles<true, 4>(rows, row_stride, num_rows, coeffs, coeff_stride, a, a_stride, tokens, count);
  else
    accumulate_tiles<false, 2>(rows, row_stride, num_rows, coeffs, coeff_stride, a, a_stride, tokens, count);
}

}  // namespace mlan::cpu

#pragma GCC diagnostic pop
