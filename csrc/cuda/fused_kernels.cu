// Both low-rank products of the output gradient g [N, out] in one pass over it (kernels.h,
// launch_grad_hidden_and_B):  grad_h = D(g Bs)  and  grad_B = (gᵀ h) ∘ S.
//
// Block (x, y) owns rank chunk y (Shape::kRank ranks) and the bands x, x + gridDim.x, ... of
// rows of g (N split evenly, at most kRows = 64 rows a band). For each band it walks `out` in
// steps of kCols columns; each step's tile of g is read from memory once and feeds both
// products:
//   grad_h[band, chunk] += g_tile Bs[step, chunk]    (accumulated across the whole walk)
//   part[step, chunk]    = g_tileᵀ h[band, chunk]     (added at once into grad_B's sums)
// The parts are added atomically into one [out, r] sum, or, when deterministic, into the
// block's own [out, r] slice of the workspace (the block's bands in order); a second kernel
// sums the slices in split order, applies the scale and rounds grad_B once.
// The next step's tiles are loaded into registers while the current one is multiplied, with
// 128-bit loads where the rows are 16-byte aligned.
#include <algorithm>
#include <cstdint>

#include "dropout.cuh"
#include "kernels.h"
#include "numeric.cuh"
#include "tile_product.cuh"  // kTensorCoreTile

namespace soslora::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
// Rows of g a band holds at most (the tile the products run on) and at least (where N
// allows): every band adds a [out, r] part into grad_B's sums.
constexpr int kRows = 64, kMinBandRows = 32;

// Per element type: a step's [kRows, kCols] tile of g, [kCols, kRank] of Bs and the band's
// [kRows, kRank] of h (plus, on tensor cores, a 16x16 float tile per warp) fit in 48 KiB of
// static shared memory. Rows are padded by 16 bytes (wmma's ldm stays a multiple of 16 bytes,
// 128-bit stores stay aligned, and column reads spread over the banks).
template <typename T> struct Shape {
  static constexpr int kCols = sizeof(T) == 8 ? 16 : 32;
  static constexpr int kRank = sizeof(T) == 2 ? 128 : sizeof(T) == 4 ? 64 : 32;
  static constexpr int kVec = 16 / sizeof(T);  // elements per 128-bit load
  static constexpr int kLdG = kCols + kVec, kLdR = kRank + kVec;
};

// A strided operand (its rows bounded by the caller); `vec`: unit column stride and 16-byte
// aligned rows.
template <typename T> struct Source {
  const T* data;
  int64_t cols, stride0, stride1;
  bool vec;
};

template <typename T> Source<T> source(const Matrix& m) {
  constexpr int kVec = Shape<T>::kVec;
  const bool vec = m.stride1 == 1 && m.stride0 % kVec == 0 &&
                   reinterpret_cast<uintptr_t>(m.data) % 16 == 0;
  return {static_cast<const T*>(m.data), m.cols, m.stride0, m.stride1, vec};
}

// The 16-byte chunks of a [kR, kC] block of a Source that this thread moves: read from
// global memory into registers (load), later written to shared memory (store). Chunks run
// along rows, so consecutive threads read consecutive addresses.
template <int kR, int kC, typename T> struct Staged {
  static constexpr int kVec = 16 / sizeof(T), kRowChunks = kC / kVec;
  static constexpr int kTotal = kR * kRowChunks;
  static constexpr int kPer = (kTotal + kThreads - 1) / kThreads;
  static_assert(kC % kVec == 0, "tile widths are whole 16-byte chunks");
  uint4 chunk[kPer];

  // Rows from row_end on and columns past the Source's read as zeros.
  __device__ __forceinline__ void load(const Source<T>& src, int64_t row0, int64_t col0,
                                       int64_t row_end) {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int idx = threadIdx.x + q * kThreads;
      if (kTotal % kThreads != 0 && idx >= kTotal) break;
      const int64_t gr = row0 + idx / kRowChunks, gc = col0 + idx % kRowChunks * kVec;
      if (src.vec && gr < row_end && gc + kVec <= src.cols) {
        chunk[q] = *reinterpret_cast<const uint4*>(src.data + gr * src.stride0 + gc);
        continue;
      }
      alignas(16) T e[kVec];
#pragma unroll
      for (int v = 0; v < kVec; ++v)
        e[v] = gr < row_end && gc + v < src.cols
                   ? src.data[gr * src.stride0 + (gc + v) * src.stride1]
                   : from_double<T>(0.0);
      chunk[q] = *reinterpret_cast<const uint4*>(e);
    }
  }

  template <int kLd> __device__ __forceinline__ void store(T* smem) const {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int idx = threadIdx.x + q * kThreads;
      if (kTotal % kThreads != 0 && idx >= kTotal) break;
      *reinterpret_cast<uint4*>(smem + idx / kRowChunks * kLd + idx % kRowChunks * kVec) =
          chunk[q];
    }
  }
};

// Tiles of 16 ranks that hold ranks of this block's chunk (the last chunk may be partial).
template <typename T> __device__ __forceinline__ int rank_tiles_of(int64_t ranks_left) {
  const int64_t ranks = ranks_left < Shape<T>::kRank ? ranks_left : Shape<T>::kRank;
  return static_cast<int>((ranks + 15) / 16);
}

template <typename T> struct Params {
  using Acc = acc_t<T>;
  Source<T> g, bs, h;
  T* grad_h;  // nullptr: not computed
  int64_t grad_h_stride0, grad_h_stride1;
  DeviceDropout<Acc> grad_h_dropout;
  Acc* sums;  // [out, r], or [splits, out, r] when deterministic; nullptr: no grad_B
  bool deterministic;
  int64_t N, out, r, bands;
};

// Adds element (o, j) of a band's part of grad_B into the sums. Deterministic: the block's
// slice, written by its first band and added to by its later ones (in band order).
template <typename T>
__device__ __forceinline__ void add_part(const Params<T>& p, int64_t o, int64_t j,
                                         acc_t<T> v, bool first_band) {
  if (o >= p.out || j >= p.r) return;
  if (!p.deterministic) {
    atomicAdd(p.sums + o * p.r + j, v);
    return;
  }
  acc_t<T>* slot = p.sums + (int64_t(blockIdx.x) * p.out + o) * p.r + j;
  *slot = first_band ? v : *slot + v;
}

template <typename T>
__device__ __forceinline__ void store_grad_h(const Params<T>& p, int64_t n, int64_t n_end,
                                             int64_t j, acc_t<T> v) {
  if (n >= n_end || j >= p.r) return;
  p.grad_h[n * p.grad_h_stride0 + j * p.grad_h_stride1] =
      round_to<T>(p.grad_h_dropout.apply(n, j, v));
}

// One band on tensor cores (wmma 16x16x16, float accumulation). Warp w holds the grad_h
// fragments of row tile w % kRowTiles and rank tiles w / kRowTiles + (kWarps / kRowTiles) i,
// and computes the part fragments of column tile w % 2 and rank tiles w / 2 + 4 i.
template <typename T>
__device__ __forceinline__ void band_tensor_cores(const Params<T>& p, T* g_s, T* bs_s,
                                                  const T* h_s, float* scratch, int64_t n0,
                                                  int64_t n_end, int64_t j0, bool first_band) {
  namespace wmma = nvcuda::wmma;
  using S = Shape<T>;
  constexpr int kRowTiles = kRows / 16, kHFrags = kRowTiles, kPFrags = 2;
  static_assert(S::kCols == 32 && S::kRank == 128 && kWarps == 8,
                "the warp layout assumes 2 column tiles and 8 rank tiles");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rank_tiles = rank_tiles_of<T>(p.r - j0);
  const bool want_h = p.grad_h != nullptr, want_B = p.sums != nullptr;
  float* tile = scratch + warp * 256;  // this warp's 16x16 staging tile

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kHFrags];
#pragma unroll
  for (int i = 0; i < kHFrags; ++i) wmma::fill_fragment(acc[i], 0.0f);
  const int h_row = warp % kRowTiles, h_rank0 = warp / kRowTiles;
  const int p_col = warp % 2, p_rank0 = warp / 2;

  Staged<kRows, S::kCols, T> g_next;
  Staged<S::kCols, S::kRank, T> bs_next;
  g_next.load(p.g, n0, 0, n_end);
  if (want_h) bs_next.load(p.bs, 0, j0, p.out);
  for (int64_t o0 = 0; o0 < p.out; o0 += S::kCols) {
    g_next.template store<S::kLdG>(g_s);
    if (want_h) bs_next.template store<S::kLdR>(bs_s);
    __syncthreads();
    if (o0 + S::kCols < p.out) {  // the next step's tiles are in flight during this one
      g_next.load(p.g, n0, o0 + S::kCols, n_end);
      if (want_h) bs_next.load(p.bs, o0 + S::kCols, j0, p.out);
    }
    if (want_h) {
#pragma unroll
      for (int kk = 0; kk < S::kCols; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, g_s + h_row * 16 * S::kLdG + kk, S::kLdG);
#pragma unroll
        for (int i = 0; i < kHFrags; ++i) {
          const int rank_tile = h_rank0 + (kWarps / kRowTiles) * i;
          if (rank_tile >= rank_tiles) continue;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, bs_s + kk * S::kLdR + rank_tile * 16, S::kLdR);
          wmma::mma_sync(acc[i], a, b, acc[i]);
        }
      }
    }
    if (want_B) {
#pragma unroll
      for (int i = 0; i < kPFrags; ++i) {
        const int rank_tile = p_rank0 + 4 * i;
        if (rank_tile >= rank_tiles) continue;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> part;
        wmma::fill_fragment(part, 0.0f);
#pragma unroll
        for (int kk = 0; kk < kRows; kk += 16) {
          // g_tileᵀ: the stored tile read column-major.
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
          wmma::load_matrix_sync(a, g_s + kk * S::kLdG + p_col * 16, S::kLdG);
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, h_s + kk * S::kLdR + rank_tile * 16, S::kLdR);
          wmma::mma_sync(part, a, b, part);
        }
        wmma::store_matrix_sync(tile, part, 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32)
          add_part(p, o0 + p_col * 16 + e / 16, j0 + rank_tile * 16 + e % 16, tile[e],
                   first_band);
        __syncwarp();
      }
    }
    __syncthreads();  // the tiles are overwritten next step
  }
  if (!want_h) return;
#pragma unroll
  for (int i = 0; i < kHFrags; ++i) {
    const int rank_tile = h_rank0 + (kWarps / kRowTiles) * i;
    if (rank_tile >= rank_tiles) continue;
    wmma::store_matrix_sync(tile, acc[i], 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32)
      store_grad_h(p, n0 + h_row * 16 + e / 16, n_end, j0 + rank_tile * 16 + e % 16, tile[e]);
    __syncwarp();
  }
}

// One band with FMA in the accumulation type. Thread (ty, tx) of a 16 x 16 layout holds
// grad_h at rows ty + 16 i and ranks tx + 16 q, and the part at columns ty + 16 i, ranks
// tx + 16 q (strided by 16, so that a warp reads spread-out banks).
template <typename T>
__device__ __forceinline__ void band_fma(const Params<T>& p, T* g_s, T* bs_s, const T* h_s,
                                         int64_t n0, int64_t n_end, int64_t j0,
                                         bool first_band) {
  using S = Shape<T>;
  using Acc = acc_t<T>;
  constexpr int kHI = kRows / 16, kQ = S::kRank / 16, kPI = S::kCols / 16;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int rank_tiles = rank_tiles_of<T>(p.r - j0);
  const bool want_h = p.grad_h != nullptr, want_B = p.sums != nullptr;
  Acc acc[kHI][kQ] = {};

  Staged<kRows, S::kCols, T> g_next;
  Staged<S::kCols, S::kRank, T> bs_next;
  g_next.load(p.g, n0, 0, n_end);
  if (want_h) bs_next.load(p.bs, 0, j0, p.out);
  for (int64_t o0 = 0; o0 < p.out; o0 += S::kCols) {
    g_next.template store<S::kLdG>(g_s);
    if (want_h) bs_next.template store<S::kLdR>(bs_s);
    __syncthreads();
    if (o0 + S::kCols < p.out) {
      g_next.load(p.g, n0, o0 + S::kCols, n_end);
      if (want_h) bs_next.load(p.bs, o0 + S::kCols, j0, p.out);
    }
    if (want_h) {
      for (int k = 0; k < S::kCols; ++k) {
        Acc a[kHI];
#pragma unroll
        for (int i = 0; i < kHI; ++i) a[i] = to_acc<Acc>(g_s[(ty + 16 * i) * S::kLdG + k]);
#pragma unroll
        for (int q = 0; q < kQ; ++q) {
          if (q >= rank_tiles) break;
          const Acc b = to_acc<Acc>(bs_s[k * S::kLdR + tx + 16 * q]);
#pragma unroll
          for (int i = 0; i < kHI; ++i) acc[i][q] += a[i] * b;
        }
      }
    }
    if (want_B) {
      Acc part[kPI][kQ] = {};
      for (int n = 0; n < kRows; ++n) {
        Acc a[kPI];
#pragma unroll
        for (int i = 0; i < kPI; ++i) a[i] = to_acc<Acc>(g_s[n * S::kLdG + ty + 16 * i]);
#pragma unroll
        for (int q = 0; q < kQ; ++q) {
          if (q >= rank_tiles) break;
          const Acc b = to_acc<Acc>(h_s[n * S::kLdR + tx + 16 * q]);
#pragma unroll
          for (int i = 0; i < kPI; ++i) part[i][q] += a[i] * b;
        }
      }
#pragma unroll
      for (int i = 0; i < kPI; ++i)
#pragma unroll
        for (int q = 0; q < kQ; ++q)
          if (q < rank_tiles)
            add_part(p, o0 + ty + 16 * i, j0 + tx + 16 * q, part[i][q], first_band);
    }
    __syncthreads();  // the tiles are overwritten next step
  }
  if (!want_h) return;
#pragma unroll
  for (int i = 0; i < kHI; ++i)
#pragma unroll
    for (int q = 0; q < kQ; ++q)
      if (q < rank_tiles)
        store_grad_h(p, n0 + ty + 16 * i, n_end, j0 + tx + 16 * q, acc[i][q]);
}

// One block per SM is the floor asked of ptxas: the band's grad_h (64 rows by up to 128
// ranks) lives in registers, and a lower cap spills (fp16, sm_80/90).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) grad_hidden_and_B_kernel(Params<T> p) {
  using S = Shape<T>;
  __shared__ __align__(32) T g_s[kRows * S::kLdG];
  __shared__ __align__(32) T bs_s[S::kCols * S::kLdR];
  __shared__ __align__(32) T h_s[kRows * S::kLdR];
  const int64_t j0 = int64_t(blockIdx.y) * S::kRank;
  for (int64_t band = blockIdx.x; band < p.bands; band += gridDim.x) {
    // Band b holds rows [b N / bands, (b + 1) N / bands): sizes differ by one row at most.
    const int64_t n0 = band * p.N / p.bands, n_end = (band + 1) * p.N / p.bands;
    const bool first_band = band == blockIdx.x;
    if (p.sums != nullptr) {  // the band's h, read by every step (the steps' barriers order it)
      Staged<kRows, S::kRank, T> h;
      h.load(p.h, n0, j0, n_end);
      h.template store<S::kLdR>(h_s);
    }
    if constexpr (kTensorCoreTile<T>) {
      __shared__ __align__(32) float scratch[kWarps * 256];
      band_tensor_cores<T>(p, g_s, bs_s, h_s, scratch, n0, n_end, j0, first_band);
    } else {
      band_fma<T>(p, g_s, bs_s, h_s, n0, n_end, j0, first_band);
    }
  }
}

template <typename Acc> __global__ void zero_kernel(Acc* data, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    data[i] = Acc(0);
}

// grad_B(o, j) = S(o, j) * sum over slices s = 0, 1, ... of sums[s, o, j], rounded once.
template <typename Out, typename Acc>
__global__ void finish_grad_B_kernel(Out* grad_B, int64_t stride0, int64_t stride1,
                                     const Acc* sums, int64_t slices, int64_t out, int64_t r,
                                     GroupScale scale) {
  const int64_t size = out * r;
  const Acc* s = static_cast<const Acc*>(scale.data);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < size;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i / r, j = i % r;
    Acc v = sums[i];
    for (int64_t k = 1; k < slices; ++k) v += sums[k * size + i];
    if (s != nullptr) v *= s[o * scale.row_stride + j / scale.group * scale.group_stride];
    grad_B[o * stride0 + j * stride1] = round_to<Out>(v);
  }
}

unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65536));
}

// The bands N is split into and the blocks that share them (see kernels.h).
struct Split {
  int64_t bands, splits;
};

Split split_rows(int64_t N, int64_t r, int64_t rank_per_block, int64_t min_blocks,
                 int64_t max_splits) {
  const int64_t chunks = std::max<int64_t>((r + rank_per_block - 1) / rank_per_block, 1);
  // As many bands as min_blocks asks (with the rank chunks), within the band heights.
  const int64_t wanted = (std::max<int64_t>(min_blocks, 1) + chunks - 1) / chunks;
  const int64_t bands = std::max((N + kRows - 1) / kRows,
                                 std::min(wanted, (N + kMinBandRows - 1) / kMinBandRows));
  return {bands, max_splits > 0 ? std::min(bands, max_splits) : bands};
}

template <typename T> int64_t rank_per_block() { return Shape<T>::kRank; }

int64_t rank_per_block(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return rank_per_block<float>();
    case DType::kFloat64: return rank_per_block<double>();
    case DType::kFloat16: return rank_per_block<__half>();
    case DType::kBFloat16: return rank_per_block<__nv_bfloat16>();
  }
  return 0;
}

template <typename T>
cudaError_t grad_hidden_and_B_typed(const Matrix& g, const Matrix& Bs, const Matrix& h,
                                    const Matrix& grad_h, const GradBOutput& grad_B,
                                    void* workspace, int64_t min_blocks, int64_t max_splits,
                                    bool deterministic, cudaStream_t stream) {
  using Acc = acc_t<T>;
  using S = Shape<T>;
  const bool want_h = grad_h.data != nullptr, want_B = grad_B.data != nullptr;
  const int64_t N = g.rows, out = g.cols, r = want_h ? Bs.cols : h.cols;
  const bool shapes = (!want_h || (Bs.rows == out && grad_h.rows == N && grad_h.cols == r)) &&
                      (!want_B || (h.rows == N && h.cols == r && workspace != nullptr));
  if (!shapes || g.dropout_seed != nullptr || Bs.dropout_seed != nullptr ||
      h.dropout_seed != nullptr || (grad_B.scale.data != nullptr && grad_B.scale.group < 1))
    return cudaErrorInvalidValue;
  if (r == 0 || (!want_h && !want_B)) return cudaSuccess;
  const Split split = split_rows(N, r, S::kRank, min_blocks, max_splits);
  const int64_t chunks = (r + S::kRank - 1) / S::kRank;
  if (chunks > 65535 || split.splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // With N = 0 there is nothing to split: grad_B is the scaled zero sum.
  const bool per_split = deterministic && split.bands > 0;
  Params<T> p{source<T>(g), source<T>(Bs), source<T>(h),
              static_cast<T*>(const_cast<void*>(grad_h.data)), grad_h.stride0, grad_h.stride1,
              device_dropout<T, Acc>(grad_h), want_B ? static_cast<Acc*>(workspace) : nullptr,
              per_split, N, out, r, split.bands};
  cudaError_t err;
  if (want_B && !per_split && out > 0) {
    zero_kernel<Acc><<<elementwise_blocks(out * r), kThreads, 0, stream>>>(p.sums, out * r);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (split.bands > 0 && (want_h || out > 0)) {
    const dim3 grid(static_cast<unsigned>(split.splits), static_cast<unsigned>(chunks));
    grad_hidden_and_B_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (!want_B || out == 0) return cudaSuccess;
  const int64_t slices = per_split ? split.splits : 1;
  if (grad_B.acc_type)
    finish_grad_B_kernel<Acc, Acc><<<elementwise_blocks(out * r), kThreads, 0, stream>>>(
        static_cast<Acc*>(grad_B.data), grad_B.stride0, grad_B.stride1, p.sums, slices, out, r,
        grad_B.scale);
  else
    finish_grad_B_kernel<T, Acc><<<elementwise_blocks(out * r), kThreads, 0, stream>>>(
        static_cast<T*>(grad_B.data), grad_B.stride0, grad_B.stride1, p.sums, slices, out, r,
        grad_B.scale);
  return cudaGetLastError();
}

}  // namespace

int64_t grad_hidden_and_B_workspace(DType dtype, int64_t N, int64_t out, int64_t r,
                                    int64_t min_blocks, int64_t max_splits, bool deterministic) {
  const Split split = split_rows(N, r, rank_per_block(dtype), min_blocks, max_splits);
  return (deterministic && split.bands > 0 ? split.splits : 1) * out * r;
}

cudaError_t launch_grad_hidden_and_B(DType dtype, const Matrix& g, const Matrix& Bs,
                                     const Matrix& h, const Matrix& grad_h,
                                     const GradBOutput& grad_B, void* workspace,
                                     int64_t min_blocks, int64_t max_splits, bool deterministic,
                                     cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return grad_hidden_and_B_typed<float>(g, Bs, h, grad_h, grad_B, workspace, min_blocks,
                                            max_splits, deterministic, stream);
    case DType::kFloat64:
      return grad_hidden_and_B_typed<double>(g, Bs, h, grad_h, grad_B, workspace, min_blocks,
                                             max_splits, deterministic, stream);
    case DType::kFloat16:
      return grad_hidden_and_B_typed<__half>(g, Bs, h, grad_h, grad_B, workspace, min_blocks,
                                             max_splits, deterministic, stream);
    case DType::kBFloat16:
      return grad_hidden_and_B_typed<__nv_bfloat16>(g, Bs, h, grad_h, grad_B, workspace,
                                                    min_blocks, max_splits, deterministic,
                                                    stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace soslora::cuda
