// Device-generic implementations of the soslora ops (ATen calls), shared by the CPU and CUDA
// registrations, plus the few device-specific pieces they need.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <optional>
#include <tuple>
#include <vector>

namespace torch {
class Library;
}

namespace soslora {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- low-rank adapter: out = base_out + (drop(x) A^T or drop(x A^T)) (B * scale)^T -------------
std::tuple<Tensor, Tensor> lowrank_forward(const Tensor& x, const Tensor& A, const Tensor& B,
                                           const Tensor& scale, const OptTensor& base_out,
                                           const OptTensor& dropout_seed, double dropout_p,
                                           bool dropout_on_input);
// The frozen linear layer and its adapter in one op: out = x Wᵀ + bias + the adapter's output,
// formed in one [N, out] buffer (the adapter is added into the base product in place).
std::tuple<Tensor, Tensor> linear_lowrank_forward(const Tensor& x, const Tensor& weight,
                                                  const OptTensor& bias, const Tensor& A,
                                                  const Tensor& B, const Tensor& scale,
                                                  const OptTensor& dropout_seed, double dropout_p,
                                                  bool dropout_on_input);
// grad_x = grad_out W + D_in(grad_hidden A), in one [N, in] buffer.
Tensor linear_lowrank_grad_x(const Tensor& grad_out, const Tensor& weight,
                             const Tensor& grad_hidden, const Tensor& A,
                             const OptTensor& dropout_seed, double dropout_p,
                             bool dropout_on_input);
std::tuple<Tensor, Tensor, Tensor> lowrank_grad_hidden(const Tensor& grad_out, const Tensor& B,
                                                       const Tensor& scale, const Tensor& hidden,
                                                       const OptTensor& dropout_seed,
                                                       double dropout_p, bool dropout_on_input);
Tensor lowrank_grad_A(const Tensor& grad_hidden, const Tensor& x, const OptTensor& dropout_seed,
                      double dropout_p, bool dropout_on_input);
Tensor lowrank_grad_x(const Tensor& grad_hidden, const Tensor& A, const OptTensor& grad_x_base,
                      const OptTensor& dropout_seed, double dropout_p, bool dropout_on_input);
// Input dropout's two input-side gradients from one mask draw: grad_x += D_in(grad_hidden A)
// in place; returns grad_A = grad_hiddenᵀ D_in(x). Equal, bit for bit, to add_product_ then
// lowrank_grad_A.
Tensor input_dropout_grads_(at::Tensor& grad_x, const Tensor& grad_hidden, const Tensor& A,
                            const Tensor& x, const Tensor& dropout_seed, double dropout_p);

// ---- cross-expert orthogonality penalty -------------------------------------------------------
Tensor ortho_penalty(const Tensor& A, int64_t num_experts);
void ortho_penalty_grad_(at::Tensor& grad_A, const Tensor& A, const Tensor& weight,
                         int64_t num_experts);
// ---- merge: weight += alpha * (B * scale) @ A -------------------------------------------------
// Both return a weight's stats, an int64 tensor [4] on its device:
//   [0], [1]  its fingerprint: sum_ij (2i+1) b_ij and sum_ij (2j+1) b_ij in wrapping arithmetic,
//             b_ij the bits of w_ij (16-bit values with an even number of columns: 32-bit words
//             of two adjacent values of a row, the odd column's value high, j the word's index;
//             otherwise 16-bit values sign-extended), mod 2^64 for float64, else mod 2^32 (in
//             [0, 2^32)): sharing.fingerprint's sums;
//   [2]       max |w_ij| as the bits of a float64 (+inf if a value is not finite);
//   [3]       weight_stats: how many values are not finite. merge_into_: 0 when it merged;
//             else nothing is merged and [0..2] are 0: -1 when the bound below did not hold,
//             or how many sums left the dtype's finite range (none of them is written, and
//             the rest of the update is taken back: the weight is as before, within one
//             rounding where the update had been written).
// weight is [out, in] in float32, float64, float16 or bfloat16, any strides.
Tensor weight_stats(const Tensor& weight);
// The update accumulated in float32 (float64 for float64 weights or factors) and rounded once;
// the stats are those of the weight written, gathered in the same pass. With max_abs (a
// known max |weight|) it first checks the merge guard's bound, that
//   (max_abs + |alpha| max_i ||(B scale)_i|| max_j ||A_:,j||) (1 + 2^-10) < the dtype's max
// (every sum within the range; Cauchy-Schwarz), and writes nothing where it does not hold.
Tensor merge_into_(at::Tensor& weight, const Tensor& A, const Tensor& B, const Tensor& scale,
                   double alpha, std::optional<double> max_abs);
// The bound's update term, |alpha| max_i ||Bs_i|| max_j ||A_:,j||, in float64 (A [r, in] and
// Bs [out, r] in the accumulation dtype): a 0-d tensor on their device (ATen; any device).
Tensor update_bound(const Tensor& A_acc, const Tensor& Bs_acc, double alpha);

// ---- cluster-local low-rank terms (CPS-LoRA) ---------------------------------------------------
// Cluster c owns the output rows row_index[row_offsets[c]:row_offsets[c+1]] and the input
// columns col_index[col_offsets[c]:col_offsets[c+1]]; its factors are the blocks
// A[:ranks[c], col_offsets[c]:col_offsets[c+1]] and B[row_offsets[c]:row_offsets[c+1], :ranks[c]]
// (A's columns and B's rows are stored in partition order), its scale is scale[c].
//   out[:, R_c] = base_out[:, R_c] + (drop(x)[:, C_c] A_c^T) (scale[c] B_c)^T
// hidden is [N, sum(ranks)], cluster c's part at its rank offset. The indices must be
// permutations: checked where they live on the CPU; on a GPU that would cost a host sync, so an
// entry out of range stops the kernel (a trap, or ATen's device assert) and a repeated one
// leaves output columns unwritten.
std::tuple<Tensor, Tensor> cluster_lowrank_forward(
    const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, const OptTensor& base_out,
    const OptTensor& dropout_seed, double dropout_p);
// (grad_x (+ grad_x_base), grad_A, grad_B) from one pass over grad_out (and grad_hidden).
std::tuple<Tensor, Tensor, Tensor> cluster_lowrank_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& A, const Tensor& B,
    const Tensor& scale, const Tensor& hidden, const OptTensor& grad_hidden,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, const OptTensor& grad_x_base,
    const OptTensor& dropout_seed, double dropout_p);

// The CPU form of the two ops above (cluster_cpu.cpp): a chunk of rows at a time, read and
// written through the index maps, no gathered copies. Called after the checks.
std::tuple<Tensor, Tensor> cluster_lowrank_forward_cpu(
    const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, std::vector<int64_t> rank_offsets,
    const OptTensor& base_out, const OptTensor& dropout_seed, double dropout_p);
std::tuple<Tensor, Tensor, Tensor> cluster_lowrank_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& A, const Tensor& B,
    const Tensor& scale, const Tensor& hidden, const OptTensor& grad_hidden,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, std::vector<int64_t> rank_offsets,
    const OptTensor& grad_x_base, const OptTensor& dropout_seed, double dropout_p);

// Checks CPS-LoRA's partition (indices, offsets, ranks, scale [num_clusters]) against x [N, in],
// A [r_max, in] and B [out, r_max]; returns the rank offsets (cluster.cpp).
std::vector<int64_t> check_cluster_layout(const Tensor& x, const Tensor& A, const Tensor& B,
                                          const Tensor& scale, const Tensor& row_index,
                                          const Tensor& col_index, at::IntArrayRef row_offsets,
                                          at::IntArrayRef col_offsets, at::IntArrayRef ranks,
                                          const char* op);

// ---- shared pieces (ATen, or the hand-written CUDA kernels where they are chosen) -------------
// hidden = D_post(D_in(x) Aᵀ): [N, r] in x's dtype.
Tensor lowrank_hidden(const Tensor& x, const Tensor& A, const OptTensor& dropout_seed,
                      double dropout_p, bool dropout_on_input);
// out += D(left @ right) in place, D the dropout of out's shape (none when dropout_p == 0).
void add_product_(Tensor& out, const Tensor& left, const Tensor& right,
                  const OptTensor& dropout_seed, double dropout_p);

// ---- helpers ----------------------------------------------------------------------------------
void check_matrix(const Tensor& t, const char* name, const char* op);
void check_lowrank_factors(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
                           const char* op);
void check_same_float_dtype(const Tensor& a, const char* a_name, const Tensor& b,
                            const char* b_name, const char* op);
// Accumulation dtype: float64 stays float64, everything else accumulates in float32.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
// t in `dtype`: t itself when it has it (no op dispatched).
inline Tensor cast(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}
// B * scale with scale of shape [r] (one per rank) or [out, r] (per output channel and rank),
// multiplied in the accumulation dtype and rounded once to B's dtype.
Tensor scaled_B(const Tensor& B, const Tensor& scale);
// Checks scale against B [out, r]: floating, on B's device, shape [r] or [out, r].
void check_scale(const Tensor& scale, const Tensor& B, const char* op);

// Dropout keep-mask of `sizes` with values 0 or 1/(1-p), dtype `dtype`, on seed's device;
// element i is decided by dropout_word(seed[0], seed[1], i) (philox.h).
Tensor dropout_scale_mask(const Tensor& seed, at::IntArrayRef sizes, double p,
                          at::ScalarType dtype);
// t * dropout_scale_mask(seed, t.sizes(), p, t.dtype) in one pass, without the mask tensor
// (identity when p == 0); the result is contiguous.
Tensor dropout_apply(const Tensor& t, const OptTensor& seed, double p);
// out += dropout_apply(t, seed, p) in place, bit-identical to it; on the CPU in one pass.
void dropout_add_(Tensor& out, const Tensor& t, const OptTensor& seed, double p);
// Whether dropout_add_and_apply_ runs the CPU loop (else the caller composes the ATen forms).
bool dropout_cpu_loop(const Tensor& t);
// One mask draw for two tensors of one shape: out += D(t), then t := D(x), in place (CPU loop).
void dropout_add_and_apply_(Tensor& out, Tensor& t, const Tensor& x, const Tensor& seed, double p);
// The op `dropout_mask`: checks its arguments, then dropout_scale_mask.
Tensor dropout_mask(const Tensor& dropout_seed, c10::SymIntArrayRef size, double dropout_p,
                    at::ScalarType dtype);
void check_dropout(const OptTensor& dropout_seed, double dropout_p, const Tensor& like,
                   const char* op);
// Writes dropout_word(seed, offset, first + j) for j < count into out (philox_cpu.cpp): the
// widest SIMD form this CPU runs, bit-identical to the scalar loop.
using PhiloxWords = void (*)(uint64_t seed, uint64_t offset, uint64_t first, int64_t count,
                             uint32_t* out);
PhiloxWords cpu_philox_words();
// 1/(1-p) rounded to `dtype` as every dropout path rounds it (exact in dtype), as a double.
double dropout_keep_value(double p, at::ScalarType dtype);
// The widest instruction set the CPU loops may use here (philox_cpu.cpp):
// SOSLORA_CPU_ISA=scalar|avx2|avx512 forces one (an error where the CPU lacks it).
enum class CpuIsa { kScalar, kAvx2, kAvx512 };
CpuIsa cpu_isa();

// Which CUDA implementation the ops use (set from Python through _C.set_cuda_path):
//   kAuto    - for each op and shape class, the faster of the kernel and ATen, measured on first
//              use (dispatch.h);
//   kKernels - the hand-written kernels wherever they exist;  kAten - ATen everywhere except
//              the dropout masks, whose kernel every path uses.
enum class CudaPath { kAuto, kKernels, kAten };
void set_cuda_path(CudaPath path);
CudaPath cuda_path();
// Tests only: CPU tensors take the fallback paths of CUDA tensors (see registration.cpp).
void set_cpu_takes_cuda_fallback(bool on);
bool cpu_takes_cuda_fallback();

// The one dispatch point for CUDA tensors: true when t is on a CUDA device for which this build
// has the hand-written kernels (compiled with CUDA, and with an image for that device). Every
// op falls back to its ATen implementation otherwise (warned once per device).
bool have_cuda_kernels(const Tensor& t);

#ifdef SOSLORA_WITH_CUDA
// What dispatch.cpp's timing needs: wait for t's device; whether t's current stream is
// capturing a CUDA graph.
void synchronize_device(const Tensor& t);
bool stream_capturing(const Tensor& t);
// `write`: a 0-d bool on the device, whether to merge (the bound's verdict), or undefined.
Tensor merge_into_cuda_(at::Tensor& weight, const Tensor& A_acc, const Tensor& Bs_acc,
                        double alpha, const Tensor& write);
Tensor weight_stats_cuda(const Tensor& weight);
void ortho_penalty_grad_cuda_(at::Tensor& grad_A, const Tensor& A, const Tensor& weight,
                              int64_t num_experts);
Tensor lowrank_hidden_cuda(const Tensor& x, const Tensor& A, const OptTensor& dropout_seed,
                           double dropout_p, bool dropout_on_input);
void add_product_cuda_(Tensor& out, const Tensor& left, const Tensor& right,
                       const OptTensor& dropout_seed, double dropout_p);
// grad_A = grad_hiddenᵀ D_in(x), D_in with dropout_p (0: none).
Tensor lowrank_grad_A_cuda(const Tensor& grad_hidden, const Tensor& x,
                           const OptTensor& dropout_seed, double dropout_p);
// One pass over grad_out [N, out] (fused_kernels.cu): (grad_hidden, grad_B) with
//   grad_hidden = D(grad_out scaled_B)  [N, r], D with dropout_p (0: none), in grad_out's dtype;
//   grad_B = (grad_outᵀ hidden) ∘ scale [out, r] in grad_B_dtype: grad_out's dtype or its
//   accumulation dtype; scale [G] or [G, out] per group of r / G ranks, or none.
// Each is undefined unless asked for (need_hidden, need_B); shapes checked by the caller.
std::tuple<Tensor, Tensor> grad_hidden_and_B_cuda(const Tensor& grad_out, const Tensor& scaled_B,
                                                  const Tensor& hidden,
                                                  const OptTensor& dropout_seed,
                                                  double dropout_p, bool need_hidden,
                                                  bool need_B, const OptTensor& scale,
                                                  at::ScalarType grad_B_dtype);
Tensor dropout_scale_mask_cuda(const Tensor& seed, at::IntArrayRef sizes, double p,
                               at::ScalarType dtype);
Tensor dropout_apply_cuda(const Tensor& t, const Tensor& seed, double p);
// CPS-LoRA's cluster form on the grouped kernels (the ops' arguments, checked by them, and the
// rank offsets): the same results as cluster.cpp's ATen path, without gathering x or
// grad_out's columns and without scattering out's or grad_x's.
std::tuple<Tensor, Tensor> cluster_lowrank_forward_cuda(
    const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, const std::vector<int64_t>& rank_offsets,
    const OptTensor& base_out, const OptTensor& dropout_seed, double dropout_p);
std::tuple<Tensor, Tensor, Tensor> cluster_lowrank_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& A, const Tensor& B,
    const Tensor& scale, const Tensor& hidden, const OptTensor& grad_hidden,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, const std::vector<int64_t>& rank_offsets,
    const OptTensor& grad_x_base, const OptTensor& dropout_seed, double dropout_p);
#endif

}  // namespace soslora
