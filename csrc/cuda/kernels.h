// Launchers for the CUDA kernels. Raw pointers and sizes only: no torch headers, so the
// kernels compile with plain nvcc; cuda_ops.cpp checks tensors and calls these.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace soslora::cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// out[i] = keep(i) ? 1/(1-p) : 0 for i < numel; seed points to device memory {seed, offset}.
cudaError_t launch_dropout_mask(void* out, DType dtype, int64_t numel, const int64_t* seed,
                                double p, cudaStream_t stream);

// out[i] = keep(i) ? in[i] * (1/(1-p) rounded to dtype) : 0 for i < numel (in, out contiguous;
// may alias): dropout applied in one pass, without a mask tensor.
cudaError_t launch_dropout_apply(void* out, const void* in, DType dtype, int64_t numel,
                                 const int64_t* seed, double p, cudaStream_t stream);

// weight[o, c] += alpha * sum_j Bs[o, j] * A[j, c], one rounding into weight's dtype.
// Bs [rows, rank] and A [rank, cols] are contiguous in the accumulation type (float, or double
// when acc_double); weight is strided (row_stride, col_stride) in `dtype`.
cudaError_t launch_merge(void* weight, DType dtype, int64_t rows, int64_t cols,
                         int64_t row_stride, int64_t col_stride, const void* Bs, const void* A,
                         int64_t rank, bool acc_double, double alpha, cudaStream_t stream);

}  // namespace soslora::cuda
