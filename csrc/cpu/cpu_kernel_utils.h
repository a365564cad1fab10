// Helpers shared by the CPU forward and backward kernels: dtype dispatch, the padded column
// layout, activation <-> acc_t conversion and the padded weights. The arithmetic loops are in
// simd.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "cpu/simd.h"
#include "mm_adapter.h"

namespace mlan::cpu {


// fn(scalar_t{}, acc_t{}) for the activations' dtype: acc_t is double for Float64, else float.
template <typename Fn>
void dispatch_dtype(ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case ScalarType::Float32: return fn(float{}, float{});
    case ScalarType::Float64: return fn(double{}, double{});
    case ScalarType::BFloat16: return fn(c10::BFloat16{}, float{});
    case ScalarType::Float16: return fn(c10::Half{}, float{});
  }
  TORCH_CHECK(false, "mlan_C: unknown activation dtype code ", static_cast<int>(dtype));
}

// Column layout of weights and partial gradients inside the kernels: group k's D/g columns
// start at k * group_stride, where group_stride is D/g rounded up to a multiple of kLanes; the
// pad columns hold zeros. Every chunk is then kLanes wide and lies inside one group. Rows of
// such matrices are row_stride = width + kLanes apart: the extra chunk keeps rows of
// power-of-two widths from mapping to the same L1 cache sets.
struct PaddedColumns {
  int64_t groups, dim_per_group, group_stride, width, row_stride;

  PaddedColumns(const AdapterShape& shape, int64_t lanes)
      : groups(shape.groups),
        dim_per_group(shape.dim_per_group()),
        group_stride((shape.dim_per_group() + lanes - 1) / lanes * lanes),
        width(shape.groups * group_stride),
        row_stride(width + lanes) {}

  // Real column of padded column `column`, or -1 for a pad.
  int64_t real(int64_t column) const {
    const int64_t offset = column % group_stride;
    return offset < dim_per_group ? column / group_stride * dim_per_group + offset : -1;
  }
};

// The rows of a tile of tokens as the micro-kernels read them: in place when the activations
// are acc_t and every group is a whole number of chunks (the padded layout is then the plain
// one), else gathered into (or scattered from) a padded acc_t buffer.
template <typename scalar_t, typename acc_t>
constexpr bool rows_in_place(const PaddedColumns& columns) {
  return std::is_same_v<scalar_t, acc_t> && columns.group_stride == columns.dim_per_group;
}

// Ask Linux for transparent huge pages on a large output the kernel is about to write for the
// first time (torch's CPU allocator maps big tensors fresh for each call, and on a 4 KiB-page
// first touch the page faults cost more than the kernel's arithmetic). Advice only: no-op where
// unsupported or where the pages already exist.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data, (void)bytes;
#endif
}

// Element conversions: static_cast, except bfloat16, done on the bits without branches (same
// result as c10: round to nearest even, NaN -> quiet NaN) so that the row loops vectorize.
template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t value) {
  return static_cast<acc_t>(value);
}

template <>
inline float to_acc<float, c10::BFloat16>(c10::BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t value) {
  return static_cast<scalar_t>(value);
}

template <>
inline c10::BFloat16 from_acc<c10::BFloat16, float>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// dst[0, padded_count) = src[0, count) converted to acc_t, then zeros.
template <typename acc_t, typename scalar_t>
inline void load_segment(const scalar_t* src, int64_t count, int64_t padded_count, acc_t* dst) {
  for (int64_t v = 0; v < count; ++v) dst[v] = to_acc<acc_t>(src[v]);
  for (int64_t v = count; v < padded_count; ++v) dst[v] = acc_t(0);
}

// dst[0, count) = src[0, count) rounded to scalar_t.
template <typename acc_t, typename scalar_t>
inline void store_segment(const acc_t* src, int64_t count, scalar_t* dst) {
  for (int64_t v = 0; v < count; ++v) dst[v] = from_acc<scalar_t>(src[v]);
}

// A [D] activation row -> padded acc_t row [width], and back.
template <typename acc_t, typename scalar_t>
void gather_row(const scalar_t* row, const PaddedColumns& columns, acc_t* padded) {
  for (int64_t k = 0; k < columns.groups; ++k)
    load_segment(row + k * columns.dim_per_group, columns.dim_per_group, columns.group_stride,
                 padded + k * columns.group_stride);
}

template <typename acc_t, typename scalar_t>
void scatter_row(const acc_t* padded, const PaddedColumns& columns, scalar_t* row) {
  for (int64_t k = 0; k < columns.groups; ++k)
    store_segment(padded + k * columns.group_stride, columns.dim_per_group,
                  row + k * columns.dim_per_group);
}

// Weights in the padded layout, acc_t, rows row_stride apart:
//   down [r, row_stride]      down[i][pad(d)] = W_A[i, d]
//   up   [E, S, row_stride]   S = r/g + 1 slots per expert; for a column d of group k,
//                             slot j < r/g holds up_weight[e, d, j] (hidden unit k*r/g + j) and
//                             slot r/g holds up_bias[e, d] (the constant-1 unit).
template <typename acc_t>
struct PaddedWeights {
  std::vector<acc_t> down, up;

  PaddedWeights(const AdapterShape& shape, const PaddedColumns& columns, const acc_t* down_weight,
                const acc_t* up_weight, const acc_t* up_bias)
      : down(shape.rank * columns.row_stride, acc_t(0)),
        up(shape.experts * shape.slots() * columns.row_stride, acc_t(0)) {
    const int64_t dim = shape.dim, per_group = shape.rank_per_group(), slots = shape.slots();
    const int64_t stride = columns.row_stride;
    for (int64_t column = 0; column < columns.width; ++column) {
      const int64_t d = columns.real(column);
      if (d < 0) continue;
      for (int64_t i = 0; i < shape.rank; ++i) down[i * stride + column] = down_weight[i * dim + d];
      for (int64_t e = 0; e < shape.experts; ++e) {
        acc_t* slot = up.data() + e * slots * stride + column;
        for (int64_t j = 0; j < per_group; ++j) slot[j * stride] = up_weight[(e * dim + d) * per_group + j];
        slot[per_group * stride] = up_bias[e * dim + d];
      }
    }
  }
};

}  // namespace mlan::cpu
