// Dropout words for runs of consecutive element indices on the CPU: the dropout mask's cost.
//
// Element i's word is word i % 4 of the Philox4x32-10 block at counter i / 4 (dropout_word in
// philox.h): ten rounds of two 32x32->64-bit products per four elements. The AVX-512 and AVX2
// forms run the rounds of 16 or 8 blocks at once (vpmuludq multiplies the even 32-bit lanes;
// the odd lanes are shifted down and multiplied separately), several chains in flight, so they
// give bit for bit the words of the scalar loop, which the CUDA kernels and reference.py also
// give. The form is chosen per op call from the CPU's features; SOSLORA_CPU_ISA=scalar|avx2|
// avx512 forces one (for tests and benchmarks).
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "philox.h"
#include "soslora.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SOSLORA_X86_SIMD 1
#endif

namespace soslora {
namespace {

void words_scalar(uint64_t seed, uint64_t offset, uint64_t first, int64_t count, uint32_t* out) {
  int64_t j = 0;
  for (; j < count && ((first + j) & 3) != 0; ++j) out[j] = dropout_word(seed, offset, first + j);
  for (; j + 4 <= count; j += 4)
    philox4(seed, offset, (first + j) >> 2, out[j], out[j + 1], out[j + 2], out[j + 3]);
  for (; j < count; ++j) out[j] = dropout_word(seed, offset, first + j);
}

#ifdef SOSLORA_X86_SIMD
// Independent vectors per iteration: a round is a chain of dependent products, so several
// chains in flight hide the multiplier's latency.
constexpr int kChains = 4;

// The low and high 32-bit halves of counters first, first + 1, ...
template <int kLanes>
void counter_halves(uint64_t first, uint32_t* lo, uint32_t* hi) {
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t counter = first + static_cast<uint64_t>(l);
    lo[l] = static_cast<uint32_t>(counter);
    hi[l] = static_cast<uint32_t>(counter >> 32);
  }
}

// (high, low) halves of the 32x32->64-bit products a * m of every 32-bit lane.
__attribute__((target("avx2"))) inline void mulhilo(__m256i a, __m256i m, __m256i& hi,
                                                    __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx512f"))) inline void mulhilo(__m512i a, __m512i m, __m512i& hi,
                                                       __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Stores the words of 8 (16) blocks, c_w holding word w of block l in lane l, as elements:
// out[4 l + w] = c_w[l]. A 4 x 4 transpose of 32-bit words inside each 128-bit lane (each
// lane then holds one block's four words), then of 128-bit lanes across the register.
__attribute__((target("avx2"))) inline void store_elements(__m256i c0, __m256i c1, __m256i c2,
                                                           __m256i c3, uint32_t* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  // b_m, 128-bit lane k: block 4 k + m.
  const __m256i b0 = _mm256_unpacklo_epi64(t0, t2), b1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i b2 = _mm256_unpacklo_epi64(t1, t3), b3 = _mm256_unpackhi_epi64(t1, t3);
  auto* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(b0, b1, 0x20));
  _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(b2, b3, 0x20));
  _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(b0, b1, 0x31));
  _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(b2, b3, 0x31));
}

__attribute__((target("avx512f"))) inline void store_elements(__m512i c0, __m512i c1,
                                                              __m512i c2, __m512i c3,
                                                              uint32_t* out) {
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  const __m512i b0 = _mm512_unpacklo_epi64(t0, t2), b1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i b2 = _mm512_unpacklo_epi64(t1, t3), b3 = _mm512_unpackhi_epi64(t1, t3);
  // Output register q holds blocks 4 q .. 4 q + 3: lane q of b0, b1, b2, b3.
  const __m512i v0 = _mm512_shuffle_i32x4(b0, b1, 0x44), v1 = _mm512_shuffle_i32x4(b2, b3, 0x44);
  const __m512i v2 = _mm512_shuffle_i32x4(b0, b1, 0xEE), v3 = _mm512_shuffle_i32x4(b2, b3, 0xEE);
  _mm512_storeu_si512(out, _mm512_shuffle_i32x4(v0, v1, 0x88));
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
}

__attribute__((target("avx2"))) void words_avx2(uint64_t seed, uint64_t offset, uint64_t first,
                                                int64_t count, uint32_t* out) {
  constexpr int kBlocks = 8 * kChains, kStep = 4 * kBlocks;
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i o0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m256i o1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const int64_t head = std::min<int64_t>(count, (4 - (first & 3)) & 3);
  words_scalar(seed, offset, first, head, out);
  alignas(32) uint32_t lo[kBlocks], hi[kBlocks];
  int64_t j = head;
  for (; j + kStep <= count; j += kStep) {
    counter_halves<kBlocks>((first + j) >> 2, lo, hi);
    __m256i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    for (int u = 0; u < kChains; ++u) {
      c0[u] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo + 8 * u));
      c1[u] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi + 8 * u));
      c2[u] = o0;
      c3[u] = o1;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int u = 0; u < kChains; ++u) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo(c0[u], m0, hi0, lo0);
        mulhilo(c2[u], m1, hi1, lo1);
        c0[u] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[u]), key0);
        c2[u] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[u]), key1);
        c1[u] = lo1;
        c3[u] = lo0;
      }
    }
    for (int u = 0; u < kChains; ++u) store_elements(c0[u], c1[u], c2[u], c3[u], out + j + 32 * u);
  }
  words_scalar(seed, offset, first + j, count - j, out + j);
}

__attribute__((target("avx512f"))) void words_avx512(uint64_t seed, uint64_t offset,
                                                     uint64_t first, int64_t count,
                                                     uint32_t* out) {
  constexpr int kBlocks = 16 * kChains, kStep = 4 * kBlocks;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i o0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m512i o1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const int64_t head = std::min<int64_t>(count, (4 - (first & 3)) & 3);
  words_scalar(seed, offset, first, head, out);
  alignas(64) uint32_t lo[kBlocks], hi[kBlocks];
  int64_t j = head;
  for (; j + kStep <= count; j += kStep) {
    counter_halves<kBlocks>((first + j) >> 2, lo, hi);
    __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    for (int u = 0; u < kChains; ++u) {
      c0[u] = _mm512_load_si512(lo + 16 * u);
      c1[u] = _mm512_load_si512(hi + 16 * u);
      c2[u] = o0;
      c3[u] = o1;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
      const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int u = 0; u < kChains; ++u) {
        __m512i hi0, lo0, hi1, lo1;
        mulhilo(c0[u], m0, hi0, lo0);
        mulhilo(c2[u], m1, hi1, lo1);
        c0[u] = _mm512_xor_si512(_mm512_xor_si512(hi1, c1[u]), key0);
        c2[u] = _mm512_xor_si512(_mm512_xor_si512(hi0, c3[u]), key1);
        c1[u] = lo1;
        c3[u] = lo0;
      }
    }
    for (int u = 0; u < kChains; ++u) store_elements(c0[u], c1[u], c2[u], c3[u], out + j + 64 * u);
  }
  words_scalar(seed, offset, first + j, count - j, out + j);
}
#endif  // SOSLORA_X86_SIMD

}  // namespace

// The widest instruction set this CPU runs, or the one SOSLORA_CPU_ISA names (an unknown name,
// or one this CPU cannot run, is an error rather than a silent fallback). Asked once per op call.
CpuIsa cpu_isa() {
  const char* forced = std::getenv("SOSLORA_CPU_ISA");
#ifdef SOSLORA_X86_SIMD
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"),
             avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
#else
  const bool avx512 = false, avx2 = false;
#endif
  if (forced == nullptr || forced[0] == '\0')
    return avx512 ? CpuIsa::kAvx512 : avx2 ? CpuIsa::kAvx2 : CpuIsa::kScalar;
  if (std::strcmp(forced, "scalar") == 0) return CpuIsa::kScalar;
  if (std::strcmp(forced, "avx2") == 0 && avx2) return CpuIsa::kAvx2;
  if (std::strcmp(forced, "avx512") == 0 && avx512) return CpuIsa::kAvx512;
  TORCH_CHECK(false, "SOSLORA_CPU_ISA=", forced,
              ": expected scalar, avx2 or avx512, one this CPU supports");
}

PhiloxWords cpu_philox_words() {
  switch (cpu_isa()) {
#ifdef SOSLORA_X86_SIMD
    case CpuIsa::kAvx512: return words_avx512;
    case CpuIsa::kAvx2: return words_avx2;
#endif
    default: return words_scalar;
  }
}

}  // namespace soslora
