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
// weight is strided (row_stride, col_stride) in `dtype`.
cudaError_t launch_merge(void* weight, DType dtype, int64_t rows, int64_t cols,
                         int64_t row_stride, int64_t col_stride, const void* Bs, const void* A,
                         int64_t rank, bool acc_double, double alpha, cudaStream_t stream);

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

namespace soslora::cuda {

// ---- one pass over the output gradient (fused_kernels.cu) ---------------------------------------
// From g = dL/dy [N, out], Bs = B * scale [out, r] and the saved hidden h [N, r], reading each
// element of g once (LoRAFusion, arXiv 2510.00206):
//   grad_h = D(g Bs)       [N, r]    D: grad_h's dropout (the hidden's mask), if any
//   grad_B = (gᵀ h) ∘ S    [out, r]  S: the group scale below, if any
// in the accumulation type (float, or double for float64 data), each rounded once.
// N is split evenly into bands of at most 64 rows: as many as `min_blocks` asks (pass the SM
// count), but of at least 32 rows where N allows. A block owns a band (or several) and walks
// `out`: grad_h for its rows is complete there; its part of grad_B is added atomically into
// one [out, r] sum (the order of the adds varies between runs), or, `deterministic`, into the
// block's own [out, r] slice of the workspace, summed in a fixed order by a second kernel
// (bitwise reproducible). `max_splits` > 0 caps the blocks along N (each then owns several
// bands): the deterministic workspace's slices. A block takes 128 ranks (16-bit types; float
// 64, double 32): larger ranks take more blocks (they count towards `min_blocks`), each
// reading g.
// g, Bs and h: strided views without dropout (g always; Bs with grad_h, h with grad_B).
// grad_h: a [N, r] Matrix in `dtype` whose dropout, if any, applies to the result.
// grad_B: [out, r] in `dtype`, or in the accumulation type when `acc_type`. An output with
// data == nullptr is not computed.
struct GroupScale {  // S(o, j) = data[o * row_stride + (j / group) * group_stride]
  const void* data = nullptr;  // in the accumulation type; nullptr: no scale
  int64_t row_stride = 0, group_stride = 0, group = 1;
};

struct GradBOutput {
  void* data = nullptr;
  int64_t stride0 = 0, stride1 = 0;
  bool acc_type = false;
  GroupScale scale;
};

// The workspace grad_B needs, in elements of the accumulation type: [out, r] for the atomic
// sum (zeroed by the launch), [splits, out, r] when deterministic (no initial value needed;
// splits: the bands, at most max_splits).
int64_t grad_hidden_and_B_workspace(DType dtype, int64_t N, int64_t out, int64_t r,
                                    int64_t min_blocks, int64_t max_splits, bool deterministic);

// Up to three launches: the atomic sum's zeroing, the pass over g, and grad_B's reduction with
// its scale and rounding. Refuses (cudaErrorInvalidValue) dropout on g, Bs or h, shapes that do
// not match, a grad_B without workspace, and a scale group below 1.
cudaError_t launch_grad_hidden_and_B(DType dtype, const Matrix& g, const Matrix& Bs,
                                     const Matrix& h, const Matrix& grad_h,
                                     const GradBOutput& grad_B, void* workspace,
                                     int64_t min_blocks, int64_t max_splits, bool deterministic,
                                     cudaStream_t stream);

}  // namespace soslora::cuda
