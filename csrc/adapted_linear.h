// The fused training step of an adapted layer (adapted_linear.cpp) and its autograd node
// (autograd.cpp).
#pragma once
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <array>
#include <mutex>

#include "soslora.h"

namespace soslora {

// Elements per thread below which the elementwise loops stay on the calling thread.
constexpr int64_t kLoopGrain = 1 << 15;
// Runs fn(begin, end) over [0, rows) rows of `cols` elements, on several threads when large.
template <typename F>
void parallel_rows(int64_t rows, int64_t cols, const F& fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kLoopGrain / std::max<int64_t>(cols, 1)), fn);
}

// Where the factors' ranks live: plain factors (no row_index), or CPS-LoRA's cluster blocks
// stored in partition order (see soslora.h, cluster_lowrank_forward).
// A block layout has both index maps or neither.
void check_index_pair(const OptTensor& row_index, const OptTensor& col_index, const char* op);

struct Layout {
  const OptTensor& row_index;
  const OptTensor& col_index;
  at::IntArrayRef row_offsets, col_offsets, ranks;
  bool blocks() const { return row_index.has_value(); }
};

// (A_c [R, in], B_c * scale [out, R]) in `dtype`: what the products of the step use.
struct Factors {
  Tensor A, scaled_B;
};
Factors dense_factors(const Tensor& A, const Tensor& B, const Tensor& scale,
                      const Layout& layout, at::ScalarType dtype);
Tensor dense_factors_A(const Tensor& A, const Layout& layout, at::ScalarType dtype);

// The op soslora::adapted_linear without autograd: the forward's output (autograd.cpp).
Tensor adapted_linear(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& base_out, const Tensor& A, const Tensor& B,
                      const Tensor& scale, const OptTensor& row_index, const OptTensor& col_index,
                      at::IntArrayRef row_offsets, at::IntArrayRef col_offsets,
                      at::IntArrayRef ranks, bool dense_blocks, double dropout_p,
                      bool dropout_on_input, const OptTensor& ortho_lambda, int64_t num_experts,
                      double grad_A_multiplier, const OptTensor& gate_logits,
                      const OptTensor& gate_temperature, double uniform_prior,
                      const OptTensor& anchor_scales, double scale_anchor);
// Returns (out, hidden, scaled_B); see adapted_linear.cpp.
std::tuple<Tensor, Tensor, Tensor> adapted_linear_forward(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& base_out,
    const Tensor& A, const Tensor& B, const Tensor& scale, const OptTensor& row_index,
    const OptTensor& col_index, at::IntArrayRef row_offsets, at::IntArrayRef col_offsets,
    at::IntArrayRef ranks, const OptTensor& dropout_seed, double dropout_p,
    bool dropout_on_input);
// (grad_x, grad_A, grad_B, grad_scale), each undefined where output_mask is false. grad_A
// includes the orthogonality term (ortho_lambda given) and the LoRA+ multiplier.
std::tuple<Tensor, Tensor, Tensor, Tensor> adapted_linear_backward(
    const Tensor& grad_out, const Tensor& x, const OptTensor& weight, const Tensor& A,
    const Tensor& B, const Tensor& scale, const Tensor& hidden, const Tensor& scaled_B,
    const OptTensor& row_index, const OptTensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, const OptTensor& dropout_seed,
    double dropout_p, bool dropout_on_input, const OptTensor& ortho_lambda, int64_t num_experts,
    double grad_A_multiplier, std::array<bool, 4> output_mask);
// grad_A += ortho_lambda * d ortho_penalty / dA (when given), then grad_A *= multiplier.
void add_A_gradient_terms_(Tensor& grad_A, const Tensor& A, const OptTensor& ortho_lambda,
                           int64_t num_experts, double grad_A_multiplier);
void check_base_args(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& base_out, int64_t out_features, const char* op);
// (seed, offset) for the dropout masks, int64 [2] on like's device, from torch's generator.
Tensor dropout_seed(const Tensor& like);

// blocks.cpp: dense[index[p], rank_offset[c] + k] = src[p, k] * scale[c] for the ranks in use,
// zero elsewhere ([n, sum(ranks)] in dtype), and its adjoint (unused rank slots zero).
// `differentiable`: the ATen form on every device (autograd records it).
Tensor place_blocks(const Tensor& src, const Tensor& index, at::IntArrayRef offsets,
                    at::IntArrayRef ranks, const OptTensor& scale, at::ScalarType dtype,
                    bool differentiable = false);
// gather_blocks gives [n, r_max], or its transpose (contiguous) when `transposed`.
Tensor gather_blocks(const Tensor& dense, const Tensor& index, at::IntArrayRef offsets,
                     at::IntArrayRef ranks, int64_t r_max, const OptTensor& scale,
                     at::ScalarType dtype, bool transposed = false);

}  // namespace soslora
