// soslora::adapted_linear: an adapted layer's training step as one C++ autograd node.
//
// The forward draws the dropout seed and runs one op (adapted_linear_forward, or the cluster
// op for CPS-LoRA's cluster form); the backward runs one op (adapted_linear_backward) with
// every gradient term inside it. Both are called through the dispatcher below autograd, so
// torch.compile traces them as two ops and a CUDA graph captures their launches. A backward
// that builds a graph (create_graph=True) differentiates the forward's composition of the
// differentiable ops instead, so double backward stays exact.
#include <torch/autograd.h>
#include <torch/library.h>

#include "adapted_linear.h"

namespace soslora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The positions of the op's arguments (also the layout of the backward's result).
enum Arg { kX, kWeight, kBias, kBaseOut, kA, kB, kScale, kNumArgs = 18 };

template <typename F>
c10::TypedOperatorHandle<F> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

#define SOSLORA_OP(name, fn) \
  static const auto name = op_handle<decltype(fn)>("soslora::" #fn)

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
Tensor value(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
std::vector<int64_t> vec(const c10::IValue& v) { return v.toIntVector(); }

// The forward of every form, through the dispatcher: (out, hidden, scaled_B or undefined,
// seed or undefined).
struct Step {
  Tensor out, hidden, scaled_B, seed;
};
Step run_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                 const OptTensor& base_out, const Tensor& A, const Tensor& B, const Tensor& scale,
                 const OptTensor& row_index, const OptTensor& col_index,
                 at::IntArrayRef row_offsets, at::IntArrayRef col_offsets, at::IntArrayRef ranks,
                 bool dense_blocks, double dropout_p, bool dropout_on_input) {
  SOSLORA_OP(seed_op, dropout_seed);
  SOSLORA_OP(forward_op, adapted_linear_forward);
  SOSLORA_OP(cluster_op, cluster_lowrank_forward);
  Step step;
  if (dropout_p > 0) step.seed = seed_op.call(x);
  if (!row_index.has_value() || dense_blocks) {
    std::tie(step.out, step.hidden, step.scaled_B) =
        forward_op.call(x, weight, bias, base_out, A, B, scale, row_index, col_index, row_offsets,
                        col_offsets, ranks, opt(step.seed), dropout_p, dropout_on_input);
    return step;
  }
  TORCH_CHECK(dropout_on_input || dropout_p == 0, "soslora::adapted_linear: the cluster form ",
              "drops the input (dropout_on_input=True)");
  check_base_args(x, weight, bias, base_out, B.size(0), "soslora::adapted_linear");
  const auto dtype = x.scalar_type();
  const OptTensor base = weight.has_value() ? OptTensor(at::linear(x, *weight, bias)) : base_out;
  std::tie(step.out, step.hidden) =
      cluster_op.call(x, cast(A, dtype), cast(B, dtype), scale, *row_index, *col_index,
                      row_offsets, col_offsets, ranks, base, opt(step.seed), dropout_p);
  return step;
}

// d(out)/d(inputs) by autograd over the differentiable ops (for double backward).
variable_list differentiable_grads(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                   const Tensor& bias, const Tensor& A, const Tensor& B,
                                   const Tensor& scale, const OptTensor& row_index,
                                   const OptTensor& col_index, at::IntArrayRef row_offsets,
                                   at::IntArrayRef col_offsets, at::IntArrayRef ranks,
                                   const OptTensor& seed, double p, bool on_input,
                                   const std::vector<bool>& needs) {
  SOSLORA_OP(lowrank_op, lowrank_forward);
  SOSLORA_OP(linear_op, linear_lowrank_forward);
  const auto dtype = x.scalar_type();
  Tensor A_c, B_c, scale_c;
  if (row_index.has_value()) {
    A_c = place_blocks(A.t(), *col_index, col_offsets, ranks, std::nullopt, dtype, true).t();
    B_c = place_blocks(B, *row_index, row_offsets, ranks, scale, dtype, true);
    scale_c = at::ones({B_c.size(1)}, scale.options());
  } else {
    A_c = A.to(dtype);  // differentiable: autograd records the cast
    B_c = B.to(dtype);
    scale_c = scale.repeat_interleave(B.size(1) / scale.size(-1), -1);
  }
  const Tensor out = weight.defined()
      ? std::get<0>(linear_op.call(x, weight, opt(bias), A_c, B_c, scale_c, seed, p, on_input))
      : std::get<0>(lowrank_op.call(x, A_c, B_c, scale_c, std::nullopt, seed, p, on_input));
  const std::array<Tensor, 7> args{x, weight, bias, Tensor(), A, B, scale};
  variable_list inputs;
  std::vector<int> where;
  for (int i = 0; i < 7; ++i)
    if (needs[i] && i != kBaseOut && args[i].defined()) {
      inputs.push_back(args[i]);
      where.push_back(i);
    }
  variable_list result(kNumArgs);
  if (inputs.empty()) return result;
  const auto grads = torch::autograd::grad({out}, inputs, {grad_out}, /*retain_graph=*/true,
                                           /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t j = 0; j < where.size(); ++j) result[where[j]] = grads[j];
  return result;
}

struct AdaptedLinear : public torch::autograd::Function<AdaptedLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& base_out, const Tensor& A,
                        const Tensor& B, const Tensor& scale, const OptTensor& row_index,
                        const OptTensor& col_index, at::IntArrayRef row_offsets,
                        at::IntArrayRef col_offsets, at::IntArrayRef ranks, bool dense_blocks,
                        double dropout_p, bool dropout_on_input, const OptTensor& ortho_lambda,
                        int64_t num_experts, double grad_A_multiplier) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Step step = run_forward(x, weight, bias, base_out, A, B, scale, row_index, col_index,
                            row_offsets, col_offsets, ranks, dense_blocks, dropout_p,
                            dropout_on_input);
    // needs_input_grad counts the tensors given: find each argument's edge.
    std::vector<int64_t> edge(7, -1);
    int64_t next = 0;
    const std::array<bool, 7> given{true, weight.has_value(), bias.has_value(),
                                    base_out.has_value(), true, true, true};
    for (int i = 0; i < 7; ++i)
      if (given[i]) edge[i] = next++;
    ctx->save_for_backward({x, value(weight), value(bias), A, B, scale, step.hidden,
                            step.scaled_B, step.seed, value(row_index), value(col_index),
                            value(ortho_lambda)});
    ctx->saved_data["edge"] = edge;
    ctx->saved_data["row_offsets"] = row_offsets.vec();
    ctx->saved_data["col_offsets"] = col_offsets.vec();
    ctx->saved_data["ranks"] = ranks.vec();
    ctx->saved_data["dense_blocks"] = dense_blocks;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["dropout_on_input"] = dropout_on_input;
    ctx->saved_data["num_experts"] = num_experts;
    ctx->saved_data["grad_A_multiplier"] = grad_A_multiplier;
    return step.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kNumArgs);
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &A = saved[3],
                 &B = saved[4], &scale = saved[5], &hidden = saved[6], &scaled_B = saved[7];
    const OptTensor seed = opt(saved[8]), row_index = opt(saved[9]), col_index = opt(saved[10]),
                    ortho_lambda = opt(saved[11]);
    const auto edge = vec(ctx->saved_data["edge"]);
    const auto row_offsets = vec(ctx->saved_data["row_offsets"]);
    const auto col_offsets = vec(ctx->saved_data["col_offsets"]);
    const auto ranks = vec(ctx->saved_data["ranks"]);
    const bool dense_blocks = ctx->saved_data["dense_blocks"].toBool();
    const double p = ctx->saved_data["dropout_p"].toDouble();
    const bool on_input = ctx->saved_data["dropout_on_input"].toBool();
    const int64_t num_experts = ctx->saved_data["num_experts"].toInt();
    const double multiplier = ctx->saved_data["grad_A_multiplier"].toDouble();
    std::vector<bool> needs(7);
    for (int i = 0; i < 7; ++i) needs[i] = edge[i] >= 0 && ctx->needs_input_grad(edge[i]);
    if (needs[kBaseOut]) result[kBaseOut] = grad_out;

    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable backward
      TORCH_CHECK_NOT_IMPLEMENTED(!row_index.has_value() || dense_blocks,
                                  "soslora::adapted_linear: double backward (create_graph=True) "
                                  "of the cluster form is not supported");
      auto diff = differentiable_grads(grad_out, x, weight, bias, A, B, scale, row_index,
                                       col_index, row_offsets, col_offsets, ranks, seed, p,
                                       on_input, needs);
      for (int i : {kX, kWeight, kBias, kB, kScale}) result[i] = diff[i];
      if (needs[kA]) {
        // The orthogonality term is a constant here (its own double backward is not defined).
        Tensor terms = at::zeros_like(A);
        add_A_gradient_terms_(terms, A.detach(), ortho_lambda, num_experts, 1.0);
        result[kA] = (diff[kA].defined() ? diff[kA] + terms : terms) * multiplier;
      }
      return result;
    }

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (needs[kWeight]) result[kWeight] = grad_out.t().mm(x);  // an unfrozen base only
    if (needs[kBias]) result[kBias] = grad_out.sum(0);
    if (!row_index.has_value() || dense_blocks) {
      SOSLORA_OP(backward_op, adapted_linear_backward);
      std::tie(result[kX], result[kA], result[kB], result[kScale]) = backward_op.call(
          grad_out, x, opt(weight), A, B, scale, hidden, scaled_B, row_index, col_index,
          row_offsets, col_offsets, ranks, seed, p, on_input, ortho_lambda, num_experts,
          multiplier, std::array<bool, 4>{needs[kX], needs[kA], needs[kB], needs[kScale]});
      return result;
    }
    SOSLORA_OP(cluster_op, cluster_lowrank_backward);
    const auto dtype = x.scalar_type();
    const OptTensor grad_x_base =
        weight.defined() && needs[kX] ? OptTensor(grad_out.mm(weight)) : std::nullopt;
    auto [grad_x, grad_A, grad_B] = cluster_op.call(
        grad_out, x, cast(A, dtype), cast(B, dtype), scale, hidden, std::nullopt, *row_index,
        *col_index, row_offsets, col_offsets, ranks, grad_x_base, seed, p);
    if (needs[kX]) result[kX] = grad_x;
    if (needs[kA]) result[kA] = cast(grad_A, A.scalar_type());
    if (needs[kB]) result[kB] = cast(grad_B, B.scalar_type());
    return result;
  }
};

Tensor adapted_linear_autograd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& base_out, const Tensor& A, const Tensor& B,
                               const Tensor& scale, const OptTensor& row_index,
                               const OptTensor& col_index, at::IntArrayRef row_offsets,
                               at::IntArrayRef col_offsets, at::IntArrayRef ranks,
                               bool dense_blocks, double dropout_p, bool dropout_on_input,
                               const OptTensor& ortho_lambda, int64_t num_experts,
                               double grad_A_multiplier) {
  return AdaptedLinear::apply(x, weight, bias, base_out, A, B, scale, row_index, col_index,
                              row_offsets, col_offsets, ranks, dense_blocks, dropout_p,
                              dropout_on_input, ortho_lambda, num_experts, grad_A_multiplier);
}

}  // namespace

// Without autograd (inference mode, or below it): the forward alone.
Tensor adapted_linear(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& base_out, const Tensor& A, const Tensor& B,
                      const Tensor& scale, const OptTensor& row_index, const OptTensor& col_index,
                      at::IntArrayRef row_offsets, at::IntArrayRef col_offsets,
                      at::IntArrayRef ranks, bool dense_blocks, double dropout_p,
                      bool dropout_on_input, const OptTensor& ortho_lambda, int64_t num_experts,
                      double grad_A_multiplier) {
  return run_forward(x, weight, bias, base_out, A, B, scale, row_index, col_index, row_offsets,
                     col_offsets, ranks, dense_blocks, dropout_p, dropout_on_input)
      .out;
}

}  // namespace soslora

TORCH_LIBRARY_IMPL(soslora, Autograd, m) {
  m.impl("adapted_linear", &soslora::adapted_linear_autograd);
}
