// Counter-based dropout decisions shared by the CPU loop and the CUDA kernel.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) maps
// (key, counter) to random bits with no state, so the backward pass recomputes exactly the
// mask the forward used from (seed, offset, element index) instead of storing it. Each of the
// four output words decides one element. The same functions are written in pure PyTorch in
// python/soslora_ext/ops/reference.py.
// No torch headers: this file compiles with nvcc or any C++ compiler.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SOSLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SOSLORA_HOST_DEVICE inline
#endif

namespace soslora {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// The four 32-bit words of Philox4x32-10 at counter (counter, offset) under key `seed`.
SOSLORA_HOST_DEVICE void philox4(uint64_t seed, uint64_t offset, uint64_t counter,
                                 uint32_t& w0, uint32_t& w1, uint32_t& w2, uint32_t& w3) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(p1);
    c2 = n2;
    c3 = static_cast<uint32_t>(p0);
  }
  w0 = c0;
  w1 = c1;
  w2 = c2;
  w3 = c3;
}

// Element `index`'s draw: word index % 4 of the Philox block at counter index / 4, so that one
// block (ten rounds) serves four consecutive elements.
SOSLORA_HOST_DEVICE uint32_t dropout_word(uint64_t seed, uint64_t offset, uint64_t index) {
  uint32_t w0, w1, w2, w3;
  philox4(seed, offset, index >> 2, w0, w1, w2, w3);
  switch (index & 3) {
    case 0: return w0;
    case 1: return w1;
    case 2: return w2;
    default: return w3;
  }
}

// An element is kept iff its 32-bit draw is >= floor(p * 2^32): probability 1 - p (to 2^-32).
SOSLORA_HOST_DEVICE uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

SOSLORA_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, uint64_t index,
                                      uint32_t threshold) {
  return dropout_word(seed, offset, index) >= threshold;
}

}  // namespace soslora
