// The one matrix-product engine behind the low-rank and penalty kernels:
//
//   for every (m, n) of an M x N result:  epilogue(m, n, sum_k left(m, k) * right(k, n))
//
// `left` and `right` are element loaders, so masks, index maps and scalings are applied as the
// tiles are read (nothing is materialized), and `epilogue` decides what happens to each result
// (store, add in place, atomic add for split-K). Each block computes a kTileM x kTileN tile over
// its share of K (blockIdx.z splits K). With 16-bit tiles (Tile = __half / __nv_bfloat16) the
// inner product runs on tensor cores (wmma, float accumulation) where the architecture has them
// for that type (fp16 from sm_70, bf16 from sm_80); otherwise it is a plain FMA loop in the
// accumulation type (float, or double for double tiles) over the same rounded tiles.
//
// Loader:   __device__ Acc operator()(int64_t row, int64_t col) const;
//           __device__ bool cols_contiguous() const;  // chooses the coalesced read order
// Epilogue: __device__ void operator()(int64_t m, int64_t n, Acc value);  (each thread has its
//           own copy, so it may keep per-thread state)
//           optionally __device__ bool active() const: when false, every block returns at once
//           (a switch read on the device, so the host never waits to decide);
//           optionally the whole tile or none of it: __device__ bool accepts(m, n, value) const
//           for every element first; if all accept, operator() for each, else refuse(count)
//           once per block (count: the elements refused); then finish() on every thread (may
//           hold barriers: the block's reduction of what the threads gathered)
#pragma once
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "numeric.cuh"

namespace soslora::cuda {

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kTileThreads = 256;

// Evaluated per compilation pass: each device architecture sees its own __CUDA_ARCH__.
template <typename Tile>
constexpr bool kTensorCoreTile =
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
    false;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    std::is_same_v<Tile, __half>;
#else
    std::is_same_v<Tile, __half> || std::is_same_v<Tile, __nv_bfloat16>;
#endif

// Reads the kRows x kCols tile of `load` at (row0, col0) into smem[r][c] (zeros outside
// [rows_end, cols_end)), in the order that makes consecutive threads read consecutive addresses.
template <int kRows, int kCols, int kLd, typename Tile, class Load>
__device__ __forceinline__ void load_tile(Tile* smem, const Load& load, int64_t row0,
                                          int64_t col0, int64_t rows_end, int64_t cols_end) {
  using Acc = acc_t<Tile>;
  const bool by_col = load.cols_contiguous();
  for (int idx = threadIdx.x; idx < kRows * kCols; idx += kTileThreads) {
    const int r = by_col ? idx / kCols : idx % kRows;
    const int c = by_col ? idx % kCols : idx / kRows;
    const int64_t gr = row0 + r, gc = col0 + c;
    const Acc v = (gr < rows_end && gc < cols_end) ? load(gr, gc) : Acc(0);
    smem[r * kLd + c] = round_to<Tile>(v);
  }
}

// Hands this thread's results of the tile (for_each(f) calls f(m, n, value) for each) to the
// epilogue: element by element, or the whole tile or none of it (see above).
template <class Epilogue, class ForEach>
__device__ __forceinline__ void finish_tile(Epilogue& epilogue, const ForEach& for_each) {
  if constexpr (requires { epilogue.refuse(1); }) {
    __shared__ int refused_s[1];
    if (threadIdx.x == 0) refused_s[0] = 0;
    __syncthreads();
    int mine = 0;
    for_each([&](int64_t m, int64_t n, auto v) { mine += !epilogue.accepts(m, n, v); });
    if (mine != 0) atomicAdd(refused_s, mine);
    __syncthreads();
    const int refused = refused_s[0];
    if (refused == 0) for_each([&](int64_t m, int64_t n, auto v) { epilogue(m, n, v); });
    else if (threadIdx.x == 0) epilogue.refuse(refused);
    epilogue.finish();
  } else {
    for_each([&](int64_t m, int64_t n, auto v) { epilogue(m, n, v); });
  }
}

template <typename Tile, class Left, class Right, class Epilogue>
__global__ void __launch_bounds__(kTileThreads)
    tile_product_kernel(int64_t M, int64_t N, int64_t K, int64_t k_chunk, Left left,
                        Right right, Epilogue epilogue_in) {
  Epilogue epilogue = epilogue_in;  // this thread's copy
  if constexpr (requires { epilogue.active(); }) {
    if (!epilogue.active()) return;
  }
  const int64_t m0 = int64_t(blockIdx.x) * kTileM, n0 = int64_t(blockIdx.y) * kTileN;
  const int64_t k_begin = int64_t(blockIdx.z) * k_chunk;
  const int64_t k_end = k_begin + k_chunk < K ? k_begin + k_chunk : K;

  if constexpr (kTensorCoreTile<Tile>) {
    namespace wmma = nvcuda::wmma;
    // Leading dimensions padded against bank conflicts; wmma needs multiples of 8 (16-bit) and
    // 4 (float) elements and 32-byte aligned fragment pointers, which these keep.
    constexpr int kLdL = kTileK + 8, kLdR = kTileN + 8, kLdC = kTileN + 4;
    __shared__ __align__(32) Tile left_s[kTileM * kLdL];
    __shared__ __align__(32) Tile right_s[kTileK * kLdR];
    __shared__ __align__(32) float result_s[kTileM * kLdC];
    // 8 warps: warp w owns rows 16*(w%4) and the two 16-column fragments at 32*(w/4).
    const int warp = threadIdx.x / 32, warp_m = (warp % 4) * 16, warp_n = (warp / 4) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
      load_tile<kTileM, kTileK, kLdL>(left_s, left, m0, k0, M, k_end);
      load_tile<kTileK, kTileN, kLdR>(right_s, right, k0, n0, k_end, N);
      __syncthreads();
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, Tile, wmma::row_major> a;
        wmma::load_matrix_sync(a, left_s + warp_m * kLdL + kk, kLdL);
        for (int f = 0; f < 2; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, Tile, wmma::row_major> b;
          wmma::load_matrix_sync(b, right_s + kk * kLdR + warp_n + 16 * f, kLdR);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
      __syncthreads();
    }
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(result_s + warp_m * kLdC + warp_n + 16 * f, acc[f], kLdC,
                              wmma::mem_row_major);
    __syncthreads();
    finish_tile(epilogue, [&](auto&& f) {
      for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kTileThreads) {
        const int r = idx / kTileN, c = idx % kTileN;
        if (m0 + r < M && n0 + c < N) f(m0 + r, n0 + c, result_s[r * kLdC + c]);
      }
    });
  } else {
    using Acc = acc_t<Tile>;
    constexpr int kPer = 4;  // each thread: a 4 x 4 block of the 64 x 64 tile
    __shared__ Tile left_s[kTileM * kTileK];   // [m][k]
    __shared__ Tile right_s[kTileK * kTileN];  // [k][n]
    const int ty = threadIdx.x / (kTileN / kPer), tx = threadIdx.x % (kTileN / kPer);
    Acc acc[kPer][kPer] = {};
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
      load_tile<kTileM, kTileK, kTileK>(left_s, left, m0, k0, M, k_end);
      load_tile<kTileK, kTileN, kTileN>(right_s, right, k0, n0, k_end, N);
      __syncthreads();
      for (int kk = 0; kk < kTileK; ++kk) {
        Acc a[kPer], b[kPer];
        // Rows and columns strided by 16 so that a warp reads spread-out banks.
        for (int i = 0; i < kPer; ++i) a[i] = to_acc<Acc>(left_s[(ty + 16 * i) * kTileK + kk]);
        for (int j = 0; j < kPer; ++j) b[j] = to_acc<Acc>(right_s[kk * kTileN + tx + 16 * j]);
        for (int i = 0; i < kPer; ++i)
          for (int j = 0; j < kPer; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
    finish_tile(epilogue, [&](auto&& f) {
      for (int i = 0; i < kPer; ++i)
        for (int j = 0; j < kPer; ++j) {
          const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
          if (m < M && n < N) f(m, n, acc[i][j]);
        }
    });
  }
}

// Launches the engine; `splits` > 1 divides K between blocks (the epilogue must then add
// atomically). Returns the launch error, if any.
template <typename Tile, class Left, class Right, class Epilogue>
cudaError_t launch_tile_product(int64_t M, int64_t N, int64_t K, int64_t splits,
                                const Left& left, const Right& right, const Epilogue& epilogue,
                                cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const int64_t grid_m = (M + kTileM - 1) / kTileM, grid_n = (N + kTileN - 1) / kTileN;
  if (splits < 1) splits = 1;
  // Whole kTileK steps per split, so only the last split has a ragged end.
  int64_t k_chunk = (K + splits - 1) / splits;
  k_chunk = ((k_chunk + kTileK - 1) / kTileK) * kTileK;
  if (k_chunk == 0) k_chunk = kTileK;
  const int64_t grid_k = (K + k_chunk - 1) / k_chunk > 0 ? (K + k_chunk - 1) / k_chunk : 1;
  if (grid_m > 0x7fffffff || grid_n > 65535 || grid_k > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n),
                  static_cast<unsigned>(grid_k));
  tile_product_kernel<Tile><<<grid, kTileThreads, 0, stream>>>(M, N, K, k_chunk, left, right,
                                                               epilogue);
  return cudaGetLastError();
}

}  // namespace soslora::cuda
