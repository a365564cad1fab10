// 32-byte SIMD vectors and the one row loop the CPU kernels use outside the tile micro-kernels
// (tile_kernels.h, built on these vectors):
//   combine_rows  a row plus a weighted sum of rows         (U_b = Σ_e coef UP_e, ∂UP_e += coef Q)
// Vectors are GCC/Clang vector extensions (one AVX register, or two SSE registers): the code
// says which loop is the SIMD one instead of hoping the auto-vectorizer picks it. This and the
// tile micro-kernels (tile_kernels.h) are compiled for the x86-64 baseline, x86-64-v3 (AVX2 +
// FMA) and x86-64-v4 (AVX-512) and the loader picks the best clone the CPU supports
// (target_clones, glibc ifunc); no -march flags, so one build
// runs on every x86-64 machine. Sums run in a fixed order: results depend only on the inputs
// (and on which clone runs), never on threads or call history.
#pragma once

#include <cstdint>
#include <cstring>

#if !defined(__GNUC__)
#error "mlan_kernels' CPU kernels need GCC or Clang (vector extensions)"
#endif

#if !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(MLAN_NO_TARGET_CLONES)
#define MLAN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MLAN_CPU_CLONES
#endif
#define MLAN_ALWAYS_INLINE __attribute__((always_inline)) inline

// Vec values pass by value only between always_inline functions, never across a call, so the
// "AVX vector return without AVX enabled changes the ABI" note does not apply here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mlan::cpu {

template <typename acc_t>
struct VectorOf {
  typedef acc_t type __attribute__((vector_size(32)));
};
template <typename acc_t>
using Vec = typename VectorOf<acc_t>::type;
template <typename acc_t>
constexpr int64_t kVecLanes = 32 / static_cast<int64_t>(sizeof(acc_t));
// Columns per chunk: two vectors, 64 bytes of acc_t (16 floats, 8 doubles). Every padded
// row (cpu_kernel_utils.h) is a whole number of chunks.
template <typename acc_t>
constexpr int64_t kLanes = 2 * kVecLanes<acc_t>;

template <typename acc_t>
MLAN_ALWAYS_INLINE Vec<acc_t> load_vec(const acc_t* source) {
  Vec<acc_t> value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

template <typename acc_t>
MLAN_ALWAYS_INLINE void store_vec(acc_t* target, Vec<acc_t> value) {
  std::memcpy(target, &value, sizeof(value));
}

template <typename acc_t>
MLAN_ALWAYS_INLINE acc_t horizontal_sum(Vec<acc_t> value) {
  acc_t total = 0;
  for (int64_t v = 0; v < kVecLanes<acc_t>; ++v) total += value[v];
  return total;
}

// out[c] = base[c] + Σ_{q < num_rows} coeffs[q * coeff_stride] * rows[q * row_stride + c] for
// c < count (count % kLanes == 0); base == nullptr means 0; out may alias base. A chunk of out
// stays in registers while all rows are added (even and odd rows into separate accumulators,
// to keep two FMA chains in flight), so out is written once per chunk.
template <typename acc_t>
MLAN_CPU_CLONES void combine_rows(const acc_t* base, const acc_t* coeffs, int64_t coeff_stride,
                                  const acc_t* rows, int64_t row_stride, int64_t num_rows,
                                  int64_t count, acc_t* out) {
  constexpr int64_t half = kVecLanes<acc_t>;
  for (int64_t c = 0; c < count; c += 2 * half) {
    Vec<acc_t> even_low = {}, even_high = {}, odd_low = {}, odd_high = {};
    int64_t q = 0;
    for (; q + 2 <= num_rows; q += 2) {
      const acc_t* row = rows + q * row_stride + c;
      const acc_t coeff_even = coeffs[q * coeff_stride], coeff_odd = coeffs[(q + 1) * coeff_stride];
      even_low += coeff_even * load_vec(row);
      even_high += coeff_even * load_vec(row + half);
      odd_low += coeff_odd * load_vec(row + row_stride);
      odd_high += coeff_odd * load_vec(row + row_stride + half);
    }
    if (q < num_rows) {
      const acc_t* row = rows + q * row_stride + c;
      even_low += coeffs[q * coeff_stride] * load_vec(row);
      even_high += coeffs[q * coeff_stride] * load_vec(row + half);
    }
    Vec<acc_t> out_low = even_low + odd_low, out_high = even_high + odd_high;
    if (base != nullptr) {
      out_low += load_vec(base + c);
      out_high += load_vec(base + c + half);
    }
    store_vec(out + c, out_low);
    store_vec(out + c + half, out_high);
  }
}

}  // namespace mlan::cpu

#pragma GCC diagnostic pop
