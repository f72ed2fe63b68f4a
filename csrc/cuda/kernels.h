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
// A [rows, cols] matrix in the kernel's dtype, element (i, j) at I*stride0 + J*stride1 with
// I = row_map[i] and J = col_map[j] where a map is given (device int64 arrays of rows / cols
// entries, each in [0, row_extent) / [0, col_extent): an entry outside stops the kernel with a
// trap, as ATen's index ops stop at a device assert), else I = i and J = j. So a gathered set of
// a tensor's rows or columns is read or written in place. With a dropout seed, element (i, j) is
// zeroed or scaled by 1/(1-p) as dropout_keep(seed, I * C + J) decides, C = col_extent with a
// column map, else cols: the mask of the [row_extent, C] tensor the matrix addresses.
struct Matrix {
  const void* data = nullptr;
  int64_t rows = 0, cols = 0, stride0 = 0, stride1 = 0;
  const int64_t* dropout_seed = nullptr;  // device {seed, offset}
  double dropout_p = 0.0;
  const int64_t* row_map = nullptr;
  const int64_t* col_map = nullptr;
  int64_t row_extent = 0, col_extent = 0;  // the maps' bounds (0: rows / cols)
};

enum class Combine {
  kStore,      // out = D(left @ right)            (out in dtype)
  kAdd,        // out += D(left @ right) in place  (out in dtype, one rounding)
  kAtomicAdd,  // out += left @ right, split over K (out in the accumulation type: float/double,
               // unit column stride, no dropout, no map)
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

// ---- CPS-LoRA's cluster form (cluster_kernels.cu) -----------------------------------------------
// The partition (soslora.h, cluster_lowrank_forward): cluster c owns the output rows
// row_index[row_offsets[c]:row_offsets[c+1]] and the input columns
// col_index[col_offsets[c]:col_offsets[c+1]]; its factors are A_c = A[:r_c, col_offsets[c]:...]
// and B_c = B[row_offsets[c]:..., :r_c], its hidden columns hidden[:, rank_offsets[c]:...]
// (r_c = rank_offsets[c+1] - rank_offsets[c]), its scale scale[c]. Each launcher runs every
// cluster's products as one grouped launch per product (more where the clusters exceed what
// one launch's parameters hold); x and the gradients are read and written through the index
// maps in place, never gathered.
struct ClusterPartition {
  int64_t clusters = 0;
  const int64_t* row_index = nullptr;     // device [out]
  const int64_t* col_index = nullptr;     // device [in]
  const int64_t* row_offsets = nullptr;   // host [clusters + 1]
  const int64_t* col_offsets = nullptr;   // host [clusters + 1]
  const int64_t* rank_offsets = nullptr;  // host [clusters + 1]
  const void* scale = nullptr;            // device [clusters], accumulation type
};

// x [N, in] (its dropout: the input's), A [r_max, in], B [out, r_max], hidden [N, sum r_c],
// out [N, out], all in `dtype` (plain matrices: the launcher adds the maps):
//   hidden_c = D(x)[:, C_c] A_cᵀ                       (stored)
//   out[:, R_c] = base[:, R_c] + s_c hidden_c B_cᵀ     (base: [N, out] or null for 0; may be out)
cudaError_t launch_cluster_forward(DType dtype, const ClusterPartition& partition,
                                   const Matrix& x, const Matrix& A, const Matrix& B,
                                   const Matrix& hidden, const Matrix& out, const Matrix* base,
                                   cudaStream_t stream);

// grad_out [N, out], x [N, in] (with the input's dropout), A, B, hidden as above:
//   grad_hidden_c = grad_hidden_in_c + s_c grad_out[:, R_c] B_c    (grad_hidden_in: or null)
//   grad_B_acc[R_c block, :r_c] += s_c grad_out[:, R_c]ᵀ hidden_c
//   grad_A_acc[:r_c, C_c block] += grad_hidden_cᵀ D(x)[:, C_c]
//   grad_x[:, C_c] = grad_x_base[:, C_c] + D(grad_hidden_c A_c)   (grad_x's dropout: the input's;
//                                                                  grad_x_base: or null for 0)
// grad_A_acc [r_max, in] and grad_B_acc [out, r_max] are contiguous in the accumulation type and
// zeroed by the caller; their sums over N are split `splits` ways between blocks (float
// atomics: bitwise reproducible with splits = 1 only).
cudaError_t launch_cluster_backward(DType dtype, const ClusterPartition& partition,
                                    const Matrix& grad_out, const Matrix& x, const Matrix& A,
                                    const Matrix& B, const Matrix& hidden,
                                    const Matrix& grad_hidden, const Matrix* grad_hidden_in,
                                    void* grad_A_acc, void* grad_B_acc, const Matrix& grad_x,
                                    const Matrix* grad_x_base, int64_t splits,
                                    cudaStream_t stream);

}  // namespace soslora::cuda
