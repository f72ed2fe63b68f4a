// CUDA kernels for dropout (masks, and applied in one pass) and the in-place merge on the tile
// engine (see kernels.h).
#include <algorithm>

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

template <typename T, typename Acc> struct MergeEpilogue {
  T* weight;
  int64_t row_stride, col_stride;
  Acc alpha;
  __device__ __forceinline__ void operator()(int64_t o, int64_t c, Acc sum) const {
    T* w = weight + o * row_stride + c * col_stride;
    *w = from_double<T>(static_cast<double>(to_acc<Acc>(*w) + alpha * sum));
  }
};

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

template <typename T, typename Acc>
cudaError_t merge_typed(void* weight, int64_t rows, int64_t cols, int64_t row_stride,
                        int64_t col_stride, const void* Bs, const void* A, int64_t rank,
                        double alpha, cudaStream_t stream) {
  return launch_tile_product<Acc>(
      rows, cols, rank, 1, DenseLoad<Acc>{static_cast<const Acc*>(Bs), rank},
      DenseLoad<Acc>{static_cast<const Acc*>(A), cols},
      MergeEpilogue<T, Acc>{static_cast<T*>(weight), row_stride, col_stride,
                            static_cast<Acc>(alpha)},
      stream);
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

cudaError_t launch_merge(void* weight, DType dtype, int64_t rows, int64_t cols,
                         int64_t row_stride, int64_t col_stride, const void* Bs, const void* A,
                         int64_t rank, bool acc_double, double alpha, cudaStream_t stream) {
  if (acc_double) {
    switch (dtype) {
      case DType::kFloat32:
        return merge_typed<float, double>(weight, rows, cols, row_stride, col_stride, Bs, A,
                                          rank, alpha, stream);
      case DType::kFloat64:
        return merge_typed<double, double>(weight, rows, cols, row_stride, col_stride, Bs, A,
                                           rank, alpha, stream);
      case DType::kFloat16:
        return merge_typed<__half, double>(weight, rows, cols, row_stride, col_stride, Bs, A,
                                           rank, alpha, stream);
      case DType::kBFloat16:
        return merge_typed<__nv_bfloat16, double>(weight, rows, cols, row_stride, col_stride,
                                                  Bs, A, rank, alpha, stream);
    }
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kFloat32:
      return merge_typed<float, float>(weight, rows, cols, row_stride, col_stride, Bs, A, rank,
                                       alpha, stream);
    case DType::kFloat16:
      return merge_typed<__half, float>(weight, rows, cols, row_stride, col_stride, Bs, A, rank,
                                        alpha, stream);
    case DType::kBFloat16:
      return merge_typed<__nv_bfloat16, float>(weight, rows, cols, row_stride, col_stride, Bs, A,
                                               rank, alpha, stream);
    case DType::kFloat64: break;  // float64 weights accumulate in double
  }
  return cudaErrorInvalidValue;
}

}  // namespace soslora::cuda
