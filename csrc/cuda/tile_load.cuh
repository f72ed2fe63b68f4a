// Operand tiles of the tile engine (tile_product.cuh) in shared memory: their layout, and how a
// k step's tile of an operand is loaded: 16-byte cp.async copies where the operand is plain data
// (adjusted in place afterwards, e.g. by a dropout mask), element loads through the loader
// otherwise.
#pragma once
#include <cuda_pipeline_primitives.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "numeric.cuh"

namespace soslora::cuda {

// Unrolls the next loop on the GPU, so that per-thread arrays indexed by its counter stay in
// registers (a rolled loop over a large body leaves them in local memory).
#if defined(__CUDACC__)
#define SOSLORA_UNROLL _Pragma("unroll")
#else
#define SOSLORA_UNROLL
#endif

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kTileThreads = 256;
static_assert(kTileM == kTileN, "both operands share one tile layout");

// Loaders that name their Element type and can hand out raw data of the tile type.
template <class Load, typename Tile>
constexpr bool kByteCopyable = [] {
  if constexpr (requires { typename Load::Element; })
    return std::is_same_v<typename Load::Element, Tile>;
  else
    return false;
}();

// A loader's column contiguity when its type fixes it: 1 or 0, else -1 (known at run time).
template <class Load> constexpr int kFixedColsContiguous = [] {
  if constexpr (requires { Load::kColsContiguous; }) return Load::kColsContiguous ? 1 : 0;
  else if constexpr (requires { typename Load::Element; }) return -1;
  else return 1;
}();

// One operand's tile in shared memory: 64 rows of the product (M for the left operand, N for
// the right) by kTileK, stored [mn][k] when kKMajor, else [k][mn]. Rows are padded by 16 bytes
// against bank conflicts; that keeps them 16-byte aligned for cp.async, wmma's ldm a multiple
// of 16 bytes and its 16 x 16 fragments 32-byte aligned.
template <typename Tile, bool kKMajor> struct OperandTile {
  static constexpr int kVec = 16 / sizeof(Tile);  // elements per 16-byte copy
  static constexpr int kOuter = kKMajor ? kTileM : kTileK;
  static constexpr int kInner = kKMajor ? kTileK : kTileM;
  static constexpr int kLd = kInner + kVec;
  static constexpr int kElements = kOuter * kLd;
  static_assert(kElements * sizeof(Tile) % 32 == 0, "stage buffers must stay 32-byte aligned");
  __device__ static constexpr int at(int mn, int k) {
    return kKMajor ? mn * kLd + k : k * kLd + mn;
  }
};

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// One operand tile of one k step: element (mn, k) for mn in [mn0, mn0 + 64) and k in
// [k0, k0 + kTileK), zero outside [0, mn_end) x [0, k_end). The left operand's element is
// load(mn, k), the right's load(k, mn). In shared memory the tile is [outer][inner] (T::at).
template <typename Tile, bool kKMajor, bool kLeft, class Load> struct TileLoad {
  using T = OperandTile<Tile, kKMajor>;
  using Acc = decltype(std::declval<Load>()(int64_t(0), int64_t(0)));
  // The inner (contiguous) dimension is the operand's columns for a k-major left operand (k)
  // and an mn-major right one (n).
  static constexpr bool kColsInner = kLeft == kKMajor;
  static constexpr int kChunksPerRow = T::kInner / T::kVec;

  const Load& load;
  int64_t outer0, inner0, outer_end, inner_end;

  __device__ __forceinline__ TileLoad(const Load& l, int64_t mn0, int64_t k0, int64_t mn_end,
                                      int64_t k_end)
      : load(l), outer0(kKMajor ? mn0 : k0), inner0(kKMajor ? k0 : mn0),
        outer_end(kKMajor ? mn_end : k_end), inner_end(kKMajor ? k_end : mn_end) {}

  // The operand's data when its tiles may be copied as bytes (aligned), else null.
  __device__ __forceinline__ const Tile* raw(int64_t& ld) const {
    if constexpr (kByteCopyable<Load, Tile>) {
      const Tile* p = load.raw(kColsInner, ld);
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % T::kVec == 0) return p;
    }
    return nullptr;
  }

  // Issues the loads: byte copies are asynchronous (they land at __pipeline_wait_prior),
  // element loads are stored at once.
  __device__ __forceinline__ void issue(Tile* smem) const {
    int64_t ld = 0;
    if (const Tile* raw_data = raw(ld)) {
      for (int c = threadIdx.x; c < T::kOuter * kChunksPerRow; c += kTileThreads) {
        const int o = c / kChunksPerRow, i = c % kChunksPerRow * T::kVec;
        const int64_t go = outer0 + o, gi = inner0 + i;
        const int64_t valid = go < outer_end ? clamp64(inner_end - gi, 0, T::kVec) : 0;
        __pipeline_memcpy_async(smem + o * T::kLd + i,
                                valid > 0 ? raw_data + go * ld + gi : raw_data, 16,
                                (T::kVec - valid) * sizeof(Tile));
      }
      return;
    }
    for (int idx = threadIdx.x; idx < T::kOuter * T::kInner; idx += kTileThreads) {
      const int o = idx / T::kInner, i = idx % T::kInner;
      const int64_t go = outer0 + o, gi = inner0 + i;
      Acc v = Acc(0);
      if (go < outer_end && gi < inner_end) v = kColsInner ? load(go, gi) : load(gi, go);
      smem[o * T::kLd + i] = round_to<Tile>(v);
    }
  }

  // After this thread's copies have landed: applies the loader's adjustment (a dropout mask)
  // to the chunks it copied, so that they hold what element loads would have stored.
  __device__ __forceinline__ void finish(Tile* smem) const {
    if constexpr (kByteCopyable<Load, Tile> && requires { load.exact(); }) {
      int64_t ld = 0;
      if (load.exact() || raw(ld) == nullptr) return;
      for (int c = threadIdx.x; c < T::kOuter * kChunksPerRow; c += kTileThreads) {
        const int o = c / kChunksPerRow, i = c % kChunksPerRow * T::kVec;
        const int64_t go = outer0 + o;
        for (int e = 0; e < T::kVec && go < outer_end && inner0 + i + e < inner_end; ++e) {
          const int64_t gi = inner0 + i + e;
          Tile& v = smem[o * T::kLd + i + e];
          v = round_to<Tile>(kColsInner ? load.adjust(go, gi, to_acc<Acc>(v))
                                        : load.adjust(gi, go, to_acc<Acc>(v)));
        }
      }
    }
  }
};

}  // namespace soslora::cuda
