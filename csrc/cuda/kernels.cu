// CUDA kernels for dropout (masks, and applied in one pass), the in-place merge on the tile
// engine with the stats of the weight it writes, and the read-only weight stats (see kernels.h).
#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../philox.h"
#include "kernels.h"
#include "numeric.cuh"
#include "tile_product.cuh"

namespace soslora::cuda {
namespace {

template <typename T>
__global__ void dropout_mask_kernel(T* out, int64_t numel, const int64_t* seed,
                                    uint32_t threshold, T keep_value) {
  const uint64_t s = static_cast<uint64_t>(seed[0]), offset = static_cast<uint64_t>(seed[1]);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = dropout_keep(s, offset, static_cast<uint64_t>(i), threshold) ? keep_value
                                                                         : from_double<T>(0.0);
}

// Same arithmetic as `in * mask` with the mask in T: a float product rounded once to T.
template <typename T>
__global__ void dropout_apply_kernel(T* out, const T* in, int64_t numel, const int64_t* seed,
                                     uint32_t threshold, T keep_value) {
  using Acc = acc_t<T>;
  const uint64_t s = static_cast<uint64_t>(seed[0]), offset = static_cast<uint64_t>(seed[1]);
  const Acc scale = to_acc<Acc>(keep_value);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const bool keep = dropout_keep(s, offset, static_cast<uint64_t>(i), threshold);
    out[i] = from_double<T>(keep ? static_cast<double>(to_acc<Acc>(in[i]) * scale) : 0.0);
  }
}

// ---- a weight's stats (soslora.h): the fingerprint's sums, max |w|, a count ------------------
// The fingerprint's words are summed mod 2^64 for 8-byte values, mod 2^32 otherwise.
template <typename T> using Word = std::conditional_t<sizeof(T) == 8, unsigned long long, unsigned>;

// What a thread gathers, then its block (block_stats), then the launch (atomics into stats).
template <typename T> struct Gathered {
  Word<T> row_sum = 0, col_sum = 0;  // sum (2i+1) b_ij and sum (2j+1) b_ij (wrapping)
  double max_abs = 0;                // +inf once a value is not finite
  unsigned long long count = 0;

  // Value w of element (i, j); `pairs`: 16-bit values with an even number of columns, whose
  // words are two adjacent values of a row, the odd column's value high.
  __device__ __forceinline__ void add(int64_t i, int64_t j, T w, bool pairs) {
    using W = Word<T>;
    W word;
    if constexpr (sizeof(T) == 2) {
      unsigned short b;
      memcpy(&b, &w, 2);
      word = pairs ? W(b) << (16 * (j & 1)) : W(unsigned(int(short(b))));
    } else {
      memcpy(&word, &w, sizeof(T));
    }
    row_sum += (W(2) * W(i) + 1) * word;
    col_sum += (pairs ? W(2) * W(j >> 1) + 1 : W(2) * W(j) + 1) * word;
    const double a = fabs(static_cast<double>(to_acc<acc_t<T>>(w)));
    max_abs = a <= 1.7976931348623157e308 ? fmax(max_abs, a) : INFINITY;  // NaN: not finite
  }
};

// The block's sums into stats (every thread calls it: it holds barriers). Non-negative
// doubles order as their bits do, so the max is an integer atomicMax.
template <typename T>
__device__ __forceinline__ void block_stats(const Gathered<T>& g, unsigned long long* stats) {
  __shared__ unsigned long long reduce_s[kTileThreads];
  const int t = threadIdx.x;  // blockDim.x == kTileThreads
  // The block's total (or max) of one value into reduce_s[0].
  const auto reduce = [&](unsigned long long mine, bool is_max) {
    reduce_s[t] = mine;
    __syncthreads();
    for (int half = kTileThreads / 2; half > 0; half /= 2) {
      if (t < half) {
        const unsigned long long a = reduce_s[t], b = reduce_s[t + half];
        reduce_s[t] = is_max ? (a > b ? a : b) : a + b;
      }
      __syncthreads();
    }
    const unsigned long long total = reduce_s[0];
    __syncthreads();  // reduce_s is reused
    return total;
  };
  const auto add = [&](int field, unsigned long long v) {
    if constexpr (sizeof(T) == 8) atomicAdd(stats + field, v);
    else  // the low half of the int64 (little-endian): the high half stays 0
      atomicAdd(reinterpret_cast<unsigned*>(stats + field), unsigned(v));
  };
  const unsigned long long rows = reduce(g.row_sum, false), cols = reduce(g.col_sum, false);
  unsigned long long max_bits;
  const double m = g.max_abs;
  memcpy(&max_bits, &m, 8);
  max_bits = reduce(max_bits, true);
  if (t == 0) {
    add(0, rows);
    add(1, cols);
    if (max_bits != 0) atomicMax(stats + 2, max_bits);
  }
  if (g.count != 0) atomicAdd(stats + 3, g.count);
}

// The merge is one product on the tile engine: Bs [rows, rank] @ A [rank, cols] in the
// accumulation type (FMA tiles: the factors are not rounded to the weight's dtype), each result
// added to its weight element and rounded once. Every element's sum runs in a fixed order, so
// merging with alpha = -1 removes exactly what alpha = 1 added.
template <typename Acc> struct DenseLoad {
  const Acc* data;
  int64_t ld;
  __device__ __forceinline__ bool cols_contiguous() const { return true; }
  __device__ __forceinline__ Acc operator()(int64_t i, int64_t j) const { return data[i * ld + j]; }
};

// Writes a tile only if every sum is within T's finite range (else counts them in stats[3]
// and flags the tile in refused[]), and gathers the stats of the values written. Does nothing
// while *write is false (the guard's bound did not hold).
template <typename T, typename Acc> struct MergeEpilogue {
  T* weight;
  int64_t row_stride, col_stride;
  Acc alpha, limit;
  bool pairs;
  const bool* write;
  unsigned long long* stats;
  unsigned char* refused;
  Gathered<T> gathered;

  __device__ __forceinline__ bool active() const { return write == nullptr || *write; }
  __device__ __forceinline__ Acc sum(int64_t o, int64_t c, Acc v) const {
    return to_acc<Acc>(weight[o * row_stride + c * col_stride]) + alpha * v;
  }
  __device__ __forceinline__ bool accepts(int64_t o, int64_t c, Acc v) const {
    return fabs(sum(o, c, v)) <= limit;  // false for NaN
  }
  __device__ __forceinline__ void operator()(int64_t o, int64_t c, Acc v) {
    const T out = from_double<T>(static_cast<double>(sum(o, c, v)));
    weight[o * row_stride + c * col_stride] = out;
    gathered.add(o, c, out, pairs);
  }
  __device__ __forceinline__ void refuse(int count) {
    refused[blockIdx.x] = 1;
    atomicAdd(stats + 3, static_cast<unsigned long long>(count));
  }
  __device__ __forceinline__ void finish() { block_stats(gathered, stats); }
};

// After a refusal (stats[3] > 0): the update subtracted again from every tile that was written
// (the same sums, one more rounding, kept within the range) and stats[0..2] zeroed.
template <typename T, typename Acc> struct TakeBackEpilogue {
  T* weight;
  int64_t row_stride, col_stride;
  Acc alpha, limit;
  unsigned long long* stats;
  const unsigned char* refused;

  __device__ __forceinline__ bool active() const {
    return static_cast<long long>(stats[3]) > 0;
  }
  __device__ __forceinline__ void operator()(int64_t o, int64_t c, Acc v) const {
    if (o == 0 && c == 0) stats[0] = stats[1] = stats[2] = 0;
    if (refused[blockIdx.x]) return;
    T* w = weight + o * row_stride + c * col_stride;
    const Acc s = to_acc<Acc>(*w) - alpha * v;
    *w = from_double<T>(static_cast<double>(fmin(fmax(s, -limit), limit)));
  }
};

// stats[3] = -1 where the guard's bound did not hold (the merge kernels did nothing).
__global__ void unchecked_kernel(const bool* write, unsigned long long* stats) {
  if (!*write) stats[3] = ~0ull;
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    weight_stats_kernel(const T* weight, int64_t lines, int64_t length, int64_t line_stride,
                        int64_t step, bool by_rows, bool pairs, unsigned long long* stats) {
  Gathered<T> g;
  for (int64_t l = blockIdx.x; l < lines; l += gridDim.x)
    for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
      const T w = weight[l * line_stride + k * step];
      g.add(by_rows ? l : k, by_rows ? k : l, w, pairs);
      if (!(fabs(static_cast<double>(to_acc<acc_t<T>>(w))) <= 1.7976931348623157e308)) ++g.count;
    }
  block_stats(g, stats);
}

template <typename T>
cudaError_t dropout_mask_typed(void* out, int64_t numel, const int64_t* seed, double p,
                               cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65536);
  dropout_mask_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<T*>(out), numel, seed, dropout_threshold(p), from_double<T>(1.0 / (1.0 - p)));
  return cudaGetLastError();
}

template <typename T>
cudaError_t dropout_apply_typed(void* out, const void* in, int64_t numel, const int64_t* seed,
                                double p, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65536);
  dropout_apply_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(in), numel, seed, dropout_threshold(p),
      from_double<T>(1.0 / (1.0 - p)));
  return cudaGetLastError();
}

template <typename T> double max_of() {
  if constexpr (std::is_same_v<T, __half>) return 65504.0;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 3.3895313892515355e38;
  else return static_cast<double>(std::numeric_limits<T>::max());
}

template <typename T, typename Acc>
cudaError_t merge_typed(void* weight, int64_t rows, int64_t cols, int64_t row_stride,
                        int64_t col_stride, const void* Bs, const void* A, int64_t rank,
                        double alpha, const bool* write, int64_t* stats, unsigned char* refused,
                        cudaStream_t stream) {
  const DenseLoad<Acc> left{static_cast<const Acc*>(Bs), rank};
  const DenseLoad<Acc> right{static_cast<const Acc*>(A), cols};
  auto* s = reinterpret_cast<unsigned long long*>(stats);
  const Acc limit = static_cast<Acc>(max_of<T>());
  const bool pairs = sizeof(T) == 2 && cols % 2 == 0;
  cudaError_t err = launch_tile_product<Acc>(
      rows, cols, rank, 1, left, right,
      MergeEpilogue<T, Acc>{static_cast<T*>(weight), row_stride, col_stride,
                            static_cast<Acc>(alpha), limit, pairs, write, s, refused, {}},
      stream);
  if (err != cudaSuccess) return err;
  if (write != nullptr) {
    unchecked_kernel<<<1, 1, 0, stream>>>(write, s);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return launch_tile_product<Acc>(
      rows, cols, rank, 1, left, right,
      TakeBackEpilogue<T, Acc>{static_cast<T*>(weight), row_stride, col_stride,
                               static_cast<Acc>(alpha), limit, s, refused},
      stream);
}

template <typename T>
cudaError_t weight_stats_typed(const void* weight, int64_t rows, int64_t cols,
                               int64_t row_stride, int64_t col_stride, int64_t* stats,
                               cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  // Lines along the dimension whose values are adjacent (coalesced reads).
  const bool by_rows = !(row_stride == 1 && col_stride != 1);
  const int64_t lines = by_rows ? rows : cols, length = by_rows ? cols : rows;
  const int64_t blocks = std::min<int64_t>(lines, 4096);
  weight_stats_kernel<T><<<static_cast<unsigned>(blocks), kTileThreads, 0, stream>>>(
      static_cast<const T*>(weight), lines, length, by_rows ? row_stride : col_stride,
      by_rows ? col_stride : row_stride, by_rows, sizeof(T) == 2 && cols % 2 == 0,
      reinterpret_cast<unsigned long long*>(stats));
  return cudaGetLastError();
}

}  // namespace

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, dropout_mask_kernel<float>);
}

cudaError_t launch_dropout_mask(void* out, DType dtype, int64_t numel, const int64_t* seed,
                                double p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return dropout_mask_typed<float>(out, numel, seed, p, stream);
    case DType::kFloat64: return dropout_mask_typed<double>(out, numel, seed, p, stream);
    case DType::kFloat16: return dropout_mask_typed<__half>(out, numel, seed, p, stream);
    case DType::kBFloat16: return dropout_mask_typed<__nv_bfloat16>(out, numel, seed, p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dropout_apply(void* out, const void* in, DType dtype, int64_t numel,
                                 const int64_t* seed, double p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return dropout_apply_typed<float>(out, in, numel, seed, p, stream);
    case DType::kFloat64: return dropout_apply_typed<double>(out, in, numel, seed, p, stream);
    case DType::kFloat16: return dropout_apply_typed<__half>(out, in, numel, seed, p, stream);
    case DType::kBFloat16:
      return dropout_apply_typed<__nv_bfloat16>(out, in, numel, seed, p, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t merge_tiles(int64_t rows, int64_t cols) {
  return ((rows + kTileM - 1) / kTileM) * ((cols + kTileN - 1) / kTileN);
}

cudaError_t launch_merge(void* weight, DType dtype, int64_t rows, int64_t cols,
                         int64_t row_stride, int64_t col_stride, const void* Bs, const void* A,
                         int64_t rank, bool acc_double, double alpha, const bool* write,
                         int64_t* stats, unsigned char* refused, cudaStream_t stream) {
#define SOSLORA_MERGE(T, Acc)                                                                    \
  return merge_typed<T, Acc>(weight, rows, cols, row_stride, col_stride, Bs, A, rank, alpha,   \
                             write, stats, refused, stream)
  if (acc_double) {
    switch (dtype) {
      case DType::kFloat32: SOSLORA_MERGE(float, double);
      case DType::kFloat64: SOSLORA_MERGE(double, double);
      case DType::kFloat16: SOSLORA_MERGE(__half, double);
      case DType::kBFloat16: SOSLORA_MERGE(__nv_bfloat16, double);
    }
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kFloat32: SOSLORA_MERGE(float, float);
    case DType::kFloat16: SOSLORA_MERGE(__half, float);
    case DType::kBFloat16: SOSLORA_MERGE(__nv_bfloat16, float);
    case DType::kFloat64: break;  // float64 weights accumulate in double
  }
#undef SOSLORA_MERGE
  return cudaErrorInvalidValue;
}

cudaError_t launch_weight_stats(const void* weight, DType dtype, int64_t rows, int64_t cols,
                                int64_t row_stride, int64_t col_stride, int64_t* stats,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return weight_stats_typed<float>(weight, rows, cols, row_stride, col_stride, stats, stream);
    case DType::kFloat64:
      return weight_stats_typed<double>(weight, rows, cols, row_stride, col_stride, stats, stream);
    case DType::kFloat16:
      return weight_stats_typed<__half>(weight, rows, cols, row_stride, col_stride, stats, stream);
    case DType::kBFloat16:
      return weight_stats_typed<__nv_bfloat16>(weight, rows, cols, row_stride, col_stride, stats,
                                               stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace soslora::cuda
