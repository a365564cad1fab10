// Philox4x32-10, first output word, for the MM-Adapter dropout mask on CPU and GPU.
// Bit-identical to mlan_kernels/reference.philox_uint32 and to Triton's tl.randint(seed, offset):
// counter (c0, c1, c2, c3) = (offset, 0, 0, 0), key (k0, k1) = (seed low 32 bits, high 32 bits).
#pragma once

#include <cstdint>

#include "mm_adapter.h"  // MLAN_HOST_DEVICE

namespace mlan {

MLAN_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint32_t counter) {
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_b = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t product_a = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t next_c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    const uint32_t next_c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    c0 = next_c0;
    c2 = next_c2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Whether hidden unit `unit` of token `token` survives dropout. The counter token*rank + unit
// is truncated to 32 bits, as in the reference (and Triton's int32 offsets).
MLAN_HOST_DEVICE bool dropout_keep(uint64_t seed, uint32_t threshold, int64_t token, int64_t rank,
                                   int64_t unit) {
  const uint32_t counter = static_cast<uint32_t>(static_cast<uint64_t>(token * rank + unit));
  return (philox_first_word(seed, counter) >> 8) >= threshold;
}

}  // namespace mlan
