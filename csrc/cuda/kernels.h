// Launchers for the CUDA kernels. Raw pointers and sizes only: no torch headers, so the
// kernels compile with plain nvcc; cuda_ops.cpp checks tensors and calls these.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace soslora::cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// cudaSuccess when this build holds code (machine code or PTX) for the current device.
cudaError_t kernel_image_status();

// out[i] = keep(i) ? 1/(1-p) : 0 for i < numel; seed points to device memory {seed, offset}.
cudaError_t launch_dropout_mask(void* out, DType dtype, int64_t numel, const int64_t* seed,
                                double p, cudaStream_t stream);

// out[i] = keep(i) ? in[i] * (1/(1-p) rounded to dtype) : 0 for i < numel (in, out contiguous;
// may alias): dropout applied in one pass, without a mask tensor.
cudaError_t launch_dropout_apply(void* out, const void* in, DType dtype, int64_t numel,
                                 const int64_t* seed, double p, cudaStream_t stream);

// weight[o, c] += alpha * sum_j Bs[o, j] * A[j, c], one rounding into weight's dtype.
// Bs [rows, rank] and A [rank, cols] are contiguous in the accumulation type (float, or double
// when acc_double: always for float64 weights, and for any weight with float64 factors);
// weight is strided (row_stride, col_stride) in `dtype`. stats (device int64 [4], zeroed by
// the caller) gets the stats of the weight written (soslora.h): the fingerprint's sums, max
// |w|. Each 64 x 64 tile is written only if all its sums are within the dtype's finite range;
// otherwise stats[3] counts the sums beyond it, the tile is flagged in refused (device bytes,
// merge_tiles(rows, cols) of them, zeroed by the caller), and a second launch takes the update
// back from every tile written (one more rounding) and zeroes stats[0..2]. write (device bool,
// or null): while false, nothing is written and stats[3] becomes -1.
cudaError_t launch_merge(void* weight, DType dtype, int64_t rows, int64_t cols,
                         int64_t row_stride, int64_t col_stride, const void* Bs, const void* A,
                         int64_t rank, bool acc_double, double alpha, const bool* write,
                         int64_t* stats, unsigned char* refused, cudaStream_t stream);
int64_t merge_tiles(int64_t rows, int64_t cols);

// The stats of a weight [rows, cols] (strided) into stats (device int64 [4], zeroed by the
// caller; soslora.h): one read.
cudaError_t launch_weight_stats(const void* weight, DType dtype, int64_t rows, int64_t cols,
                                int64_t row_stride, int64_t col_stride, int64_t* stats,
                                cudaStream_t stream);

}  // namespace soslora::cuda

namespace soslora::cuda {

// ---- low-rank products (lowrank_kernels.cu) -----------------------------------------------------
// A [rows, cols] matrix in the kernel's dtype, element (i, j) at i*stride0 + j*stride1.
// With a dropout seed, element (i, j) is zeroed or scaled by 1/(1-p) as
// dropout_keep(seed, i * cols + j) decides: the mask of a [rows, cols] tensor, regenerated.
struct Matrix {
  const void* data = nullptr;
  int64_t rows = 0, cols = 0, stride0 = 0, stride1 = 0;
  const int64_t* dropout_seed = nullptr;  // device {seed, offset}
  double dropout_p = 0.0;
};

enum class Combine {
  kStore,      // out = D(left @ right)            (out in dtype)
  kAdd,        // out += D(left @ right) in place  (out in dtype, one rounding)
  kAtomicAdd,  // out += left @ right, split over K (out in the accumulation type: float/double)
};

// left [M, K] @ right [K, N] combined into out [M, N]; D is out's dropout, a transposed operand
// is a Matrix with swapped strides.
// splits > 1 (K divided between blocks) only with kAtomicAdd; the float atomics then add in a
// schedule-dependent order (splits = 1 is bitwise reproducible). Shapes are checked by the caller.
cudaError_t launch_product(DType dtype, const Matrix& left, const Matrix& right,
                           const Matrix& out, Combine combine, int64_t splits,
                           cudaStream_t stream);

// Gradient of the cross-expert orthogonality penalty (see ortho.cpp), added in place:
//   grad_A += weight[0] * d penalty(A) / dA
// A and grad_A: contiguous [r_tot, in] in `dtype`; weight: one element in the accumulation type
// on the device; workspace: [2, r_tot, r_tot] in the accumulation type, the first half zeroed.
// Three launches: the Gram matrix of A's rows, the [r_tot, r_tot] coefficients (normalization
// folded in), then the gradient as one product of the coefficients with A. Each does nothing
// while weight[0] is 0. `deterministic` gives every Gram element one atomic add (fixed order).
cudaError_t launch_ortho_penalty_grad(DType dtype, void* grad_A, const void* A, int64_t r_tot,
                                      int64_t in, int64_t num_experts, const void* weight,
                                      void* workspace, bool deterministic, cudaStream_t stream);

}  // namespace soslora::cuda
