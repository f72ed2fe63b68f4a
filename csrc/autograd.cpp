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

// The positions of the op's differentiable arguments in the backward's result (gate_logits is
// argument 18 of 23; the rest are 0-6).
enum Arg { kX, kWeight, kBias, kBaseOut, kA, kB, kScale, kGateLogits };
constexpr int kNumTensorArgs = 8, kNumArgs = 23;
constexpr int position(int arg) { return arg == kGateLogits ? 18 : arg; }

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
  constexpr const char* op = "soslora::adapted_linear";
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  check_index_pair(row_index, col_index, op);
  Step step;
  if (dropout_p > 0) step.seed = seed_op.call(x);
  if (!row_index.has_value() || dense_blocks) {
    std::tie(step.out, step.hidden, step.scaled_B) =
        forward_op.call(x, weight, bias, base_out, A, B, scale, row_index, col_index, row_offsets,
                        col_offsets, ranks, opt(step.seed), dropout_p, dropout_on_input);
    return step;
  }
  TORCH_CHECK(dropout_on_input || dropout_p == 0, op,
              ": the cluster form drops the input (dropout_on_input=True)");
  check_base_args(x, weight, bias, base_out, B.size(0), op);
  for (const auto& [t, name] : {std::pair{&A, "A"}, std::pair{&B, "B"}})  // before the casts
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name,
                " must be floating-point, got ", t->scalar_type());
  const auto dtype = x.scalar_type();
  const OptTensor base = weight.has_value() ? OptTensor(at::linear(x, *weight, bias)) : base_out;
  std::tie(step.out, step.hidden) =
      cluster_op.call(x, cast(A, dtype), cast(B, dtype), scale, *row_index, *col_index,
                      row_offsets, col_offsets, ranks, base, opt(step.seed), dropout_p);
  return step;
}

// The scale terms of SOS-LoRA's recipe: a mean-1 gate K softmax(logits / T) over the experts,
// and two gradient terms without a loss of their own, added whenever the backward runs: the
// uniform prior on the logits, uniform_prior (p - 1/K) / T, and the anchor of channel scales,
// scale_anchor (scale - anchor_scales).
struct ScaleTerms {
  OptTensor gate_logits, temperature, anchor_scales;
  double uniform_prior, scale_anchor;
};

void check_scale_terms(const Tensor& scale, const OptTensor& row_index, const ScaleTerms& terms) {
  constexpr const char* op = "soslora::adapted_linear";
  const auto& logits = terms.gate_logits;
  const auto& anchor = terms.anchor_scales;
  TORCH_CHECK(scale.dim() == 1 || scale.dim() == 2, op, ": scale must be [G] or [G, out], got ",
              scale.sizes());
  TORCH_CHECK(!row_index.has_value() || !(logits.has_value() || anchor.has_value()), op,
              ": gate_logits and anchor_scales apply to plain factors, not to cluster blocks");
  TORCH_CHECK(logits.has_value() == terms.temperature.has_value(), op,
              ": gate_logits and gate_temperature come together");
  for (const auto& [t, name] : {std::pair{&logits, "gate_logits"},
                                std::pair{&terms.temperature, "gate_temperature"},
                                std::pair{&anchor, "anchor_scales"}}) {
    if (!t->has_value()) continue;
    TORCH_CHECK(at::isFloatingType((*t)->scalar_type()) && (*t)->device() == scale.device(),
                op, ": ", name, " must be a floating-point tensor on scale's device ",
                scale.device(), ", got ", (*t)->scalar_type(), " on ", (*t)->device());
  }
  const int64_t G = scale.size(0);
  if (logits.has_value()) {
    TORCH_CHECK(logits->dim() == 1 && logits->size(0) == G, op, ": gate_logits must be [G] = [",
                G, "] (one per group of the scale), got ", logits->sizes());
    TORCH_CHECK(terms.temperature->numel() == 1 && terms.temperature->dim() <= 1, op,
                ": gate_temperature must be 0-d or have one element, got shape ",
                terms.temperature->sizes());
  }
  if (anchor.has_value())
    TORCH_CHECK(scale.dim() == 2 && anchor->dim() == 1 && anchor->size(0) == G, op,
                ": anchor_scales must be [G] = [", G, "] with a [G, out] scale, got ",
                anchor->sizes(), " with scale ", scale.sizes());
}

// The orthogonality term's arguments, checked in the forward although the backward uses them.
void check_ortho_term(const Tensor& A, const OptTensor& ortho_lambda, int64_t num_experts) {
  constexpr const char* op = "soslora::adapted_linear";
  TORCH_CHECK(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  if (!ortho_lambda.has_value() || num_experts == 1) return;
  const Tensor& lambda = *ortho_lambda;
  TORCH_CHECK(lambda.numel() == 1 && at::isFloatingType(lambda.scalar_type()) &&
                  lambda.device() == A.device(),
              op, ": ortho_lambda must be a floating-point tensor with one element on A's device ",
              A.device(), ", got ", lambda.scalar_type(), " of shape ", lambda.sizes(), " on ",
              lambda.device());
  TORCH_CHECK(A.dim() != 2 || A.size(0) % num_experts == 0, op, ": A.size(0) = ",
              A.dim() == 2 ? A.size(0) : 0, " must be divisible by num_experts = ", num_experts);
}

// The scale the products use: scale times the gate (per expert; broadcast over channels).
Tensor gated(const Tensor& scale, const Tensor& gate) {
  return scale * (scale.dim() == 1 ? gate : gate.unsqueeze(1));
}

// (the gate's softmax p, the gate K p) from the logits.
std::pair<Tensor, Tensor> gate_of(const Tensor& logits, const Tensor& temperature) {
  const Tensor p = at::softmax(logits / temperature, 0);
  return {p, p * static_cast<double>(logits.size(0))};
}

// The gradients of scale and logits from that of the gated scale, plus the terms.
std::pair<Tensor, Tensor> scale_grads(const Tensor& grad_eff, const Tensor& scale,
                                      const ScaleTerms& terms, const Tensor& p,
                                      const Tensor& gate, bool need_scale, bool need_logits) {
  Tensor grad_scale, grad_logits;
  if (need_scale) {
    grad_scale = gate.defined() ? gated(grad_eff, gate) : grad_eff;
    if (terms.anchor_scales.has_value() && terms.scale_anchor != 0)
      grad_scale = grad_scale + terms.scale_anchor * (scale - terms.anchor_scales->unsqueeze(1));
  }
  if (need_logits) {
    const Tensor& T = *terms.temperature;
    const Tensor g = scale.dim() == 1 ? grad_eff * scale : (grad_eff * scale).sum(1);
    const double K = static_cast<double>(p.size(0));
    // d(K softmax(l / T)) / dl, then the uniform prior.
    grad_logits = (K * p * (g - (g * p).sum()) + terms.uniform_prior * (p - 1.0 / K)) / T;
  }
  return {grad_scale, grad_logits};
}

// d(out)/d(inputs) by autograd over the differentiable ops (for double backward); the scale
// terms are added as constants, as the recipe adds them.
variable_list differentiable_grads(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                   const Tensor& bias, const Tensor& A, const Tensor& B,
                                   const Tensor& scale, const OptTensor& row_index,
                                   const OptTensor& col_index, at::IntArrayRef row_offsets,
                                   at::IntArrayRef col_offsets, at::IntArrayRef ranks,
                                   const OptTensor& seed, double p, bool on_input,
                                   const ScaleTerms& terms, const std::vector<bool>& needs) {
  SOSLORA_OP(lowrank_op, lowrank_forward);
  SOSLORA_OP(linear_op, linear_lowrank_forward);
  const auto dtype = x.scalar_type();
  const Tensor logits = value(terms.gate_logits);
  Tensor A_c, B_c, scale_c;
  if (row_index.has_value()) {
    A_c = place_blocks(A.t(), *col_index, col_offsets, ranks, std::nullopt, dtype, true).t();
    B_c = place_blocks(B, *row_index, row_offsets, ranks, scale, dtype, true);
    scale_c = at::ones({B_c.size(1)}, scale.options());
  } else {
    A_c = A.to(dtype);  // differentiable: autograd records the casts
    B_c = B.to(dtype);
    const Tensor eff = logits.defined() ? gated(scale, gate_of(logits, *terms.temperature).second)
                                        : scale;
    // Per rank ([r], or [out, r] for channel scales), as the differentiable ops take it.
    scale_c = (eff.dim() == 1 ? eff : eff.t()).repeat_interleave(B.size(1) / scale.size(0), -1);
  }
  const Tensor out = weight.defined()
      ? std::get<0>(linear_op.call(x, weight, opt(bias), A_c, B_c, scale_c, seed, p, on_input))
      : std::get<0>(lowrank_op.call(x, A_c, B_c, scale_c, std::nullopt, seed, p, on_input));
  const std::array<Tensor, kNumTensorArgs> args{x, weight, bias, Tensor(), A, B, scale, logits};
  variable_list inputs;
  std::vector<int> where;
  for (int i = 0; i < kNumTensorArgs; ++i)
    if (needs[i] && i != kBaseOut && args[i].defined()) {
      inputs.push_back(args[i]);
      where.push_back(i);
    }
  variable_list result(kNumTensorArgs);  // by Arg
  if (inputs.empty()) return result;
  const auto grads = torch::autograd::grad({out}, inputs, {grad_out}, /*retain_graph=*/true,
                                           /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t j = 0; j < where.size(); ++j) result[where[j]] = grads[j];
  // The recipe's terms, constant in the inputs.
  if (logits.defined() || terms.anchor_scales.has_value()) {
    const at::NoGradGuard no_grad;
    Tensor gate, probs;
    if (logits.defined()) std::tie(probs, gate) = gate_of(logits, *terms.temperature);
    auto [extra_scale, extra_logits] = scale_grads(at::zeros_like(scale), scale.detach(), terms,
                                                   probs, gate, needs[kScale],
                                                   needs[kGateLogits]);
    for (auto [i, extra] : {std::pair{kScale, extra_scale}, std::pair{kGateLogits, extra_logits}})
      if (extra.defined()) result[i] = result[i].defined() ? result[i] + extra : extra;
  }
  return result;
}

struct AdaptedLinear : public torch::autograd::Function<AdaptedLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& base_out, const Tensor& A,
                        const Tensor& B, const Tensor& scale, const OptTensor& row_index,
                        const OptTensor& col_index, at::IntArrayRef row_offsets,
                        at::IntArrayRef col_offsets, at::IntArrayRef ranks, bool dense_blocks,
                        double dropout_p, bool dropout_on_input, const OptTensor& ortho_lambda,
                        int64_t num_experts, double grad_A_multiplier,
                        const OptTensor& gate_logits, const OptTensor& gate_temperature,
                        double uniform_prior, const OptTensor& anchor_scales,
                        double scale_anchor) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    check_scale_terms(scale, row_index,
                      {gate_logits, gate_temperature, anchor_scales, uniform_prior, scale_anchor});
    check_ortho_term(A, ortho_lambda, num_experts);
    Tensor probs, gate;
    if (gate_logits.has_value()) std::tie(probs, gate) = gate_of(*gate_logits, *gate_temperature);
    Step step = run_forward(x, weight, bias, base_out, A, B,
                            gate.defined() ? gated(scale, gate) : scale, row_index, col_index,
                            row_offsets, col_offsets, ranks, dense_blocks, dropout_p,
                            dropout_on_input);
    // needs_input_grad counts the tensors given: find each differentiable argument's edge.
    const std::array<bool, 13> given{true,
                                     weight.has_value(),
                                     bias.has_value(),
                                     base_out.has_value(),
                                     true,
                                     true,
                                     true,
                                     row_index.has_value(),
                                     col_index.has_value(),
                                     ortho_lambda.has_value(),
                                     gate_logits.has_value(),
                                     gate_temperature.has_value(),
                                     anchor_scales.has_value()};
    std::vector<int64_t> edge(kNumTensorArgs, -1);
    int64_t next = 0;
    for (int i = 0; i < 13; ++i) {
      const int arg = i < 7 ? i : (i == 10 ? kGateLogits : -1);  // the differentiable ones
      if (given[i] && arg >= 0) edge[arg] = next;
      next += given[i];
    }
    ctx->save_for_backward({x, value(weight), value(bias), A, B, scale, step.hidden,
                            step.scaled_B, step.seed, value(row_index), value(col_index),
                            value(ortho_lambda), value(gate_logits), value(gate_temperature),
                            value(anchor_scales), probs, gate});
    ctx->saved_data["edge"] = edge;
    ctx->saved_data["row_offsets"] = row_offsets.vec();
    ctx->saved_data["col_offsets"] = col_offsets.vec();
    ctx->saved_data["ranks"] = ranks.vec();
    ctx->saved_data["dense_blocks"] = dense_blocks;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["dropout_on_input"] = dropout_on_input;
    ctx->saved_data["num_experts"] = num_experts;
    ctx->saved_data["grad_A_multiplier"] = grad_A_multiplier;
    ctx->saved_data["uniform_prior"] = uniform_prior;
    ctx->saved_data["scale_anchor"] = scale_anchor;
    return step.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kNumArgs);
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &A = saved[3],
                 &B = saved[4], &scale = saved[5], &hidden = saved[6], &scaled_B = saved[7],
                 &probs = saved[15], &gate = saved[16];
    const OptTensor seed = opt(saved[8]), row_index = opt(saved[9]), col_index = opt(saved[10]),
                    ortho_lambda = opt(saved[11]);
    const ScaleTerms terms{opt(saved[12]), opt(saved[13]), opt(saved[14]),
                           ctx->saved_data["uniform_prior"].toDouble(),
                           ctx->saved_data["scale_anchor"].toDouble()};
    const auto edge = vec(ctx->saved_data["edge"]);
    const auto row_offsets = vec(ctx->saved_data["row_offsets"]);
    const auto col_offsets = vec(ctx->saved_data["col_offsets"]);
    const auto ranks = vec(ctx->saved_data["ranks"]);
    const bool dense_blocks = ctx->saved_data["dense_blocks"].toBool();
    const double p = ctx->saved_data["dropout_p"].toDouble();
    const bool on_input = ctx->saved_data["dropout_on_input"].toBool();
    const int64_t num_experts = ctx->saved_data["num_experts"].toInt();
    const double multiplier = ctx->saved_data["grad_A_multiplier"].toDouble();
    std::vector<bool> needs(kNumTensorArgs);
    for (int i = 0; i < kNumTensorArgs; ++i)
      needs[i] = edge[i] >= 0 && ctx->needs_input_grad(edge[i]);
    if (needs[kBaseOut]) result[kBaseOut] = grad_out;

    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable backward
      TORCH_CHECK_NOT_IMPLEMENTED(!row_index.has_value() || dense_blocks,
                                  "soslora::adapted_linear: double backward (create_graph=True) "
                                  "of the cluster form is not supported");
      auto diff = differentiable_grads(grad_out, x, weight, bias, A, B, scale, row_index,
                                       col_index, row_offsets, col_offsets, ranks, seed, p,
                                       on_input, terms, needs);
      for (int i : {kX, kWeight, kBias, kB, kScale, kGateLogits}) result[position(i)] = diff[i];
      if (needs[kA]) {
        // The orthogonality term is a constant here (its own double backward is not defined).
        Tensor extra = at::zeros_like(A);
        add_A_gradient_terms_(extra, A.detach(), ortho_lambda, num_experts, 1.0);
        result[kA] = (diff[kA].defined() ? diff[kA] + extra : extra) * multiplier;
      }
      return result;
    }

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (needs[kWeight]) result[kWeight] = grad_out.t().mm(x);  // an unfrozen base only
    if (needs[kBias]) result[kBias] = grad_out.sum(0);
    if (!row_index.has_value() || dense_blocks) {
      SOSLORA_OP(backward_op, adapted_linear_backward);
      const bool need_eff = needs[kScale] || needs[kGateLogits];
      Tensor grad_eff;
      std::tie(result[kX], result[kA], result[kB], grad_eff) = backward_op.call(
          grad_out, x, opt(weight), A, B, gate.defined() ? gated(scale, gate) : scale, hidden,
          scaled_B, row_index, col_index, row_offsets, col_offsets, ranks, seed, p, on_input,
          ortho_lambda, num_experts, multiplier,
          std::array<bool, 4>{needs[kX], needs[kA], needs[kB], need_eff});
      if (need_eff)
        std::tie(result[kScale], result[position(kGateLogits)]) =
            scale_grads(grad_eff, scale, terms, probs, gate, needs[kScale], needs[kGateLogits]);
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
                               double grad_A_multiplier, const OptTensor& gate_logits,
                               const OptTensor& gate_temperature, double uniform_prior,
                               const OptTensor& anchor_scales, double scale_anchor) {
  return AdaptedLinear::apply(x, weight, bias, base_out, A, B, scale, row_index, col_index,
                              row_offsets, col_offsets, ranks, dense_blocks, dropout_p,
                              dropout_on_input, ortho_lambda, num_experts, grad_A_multiplier,
                              gate_logits, gate_temperature, uniform_prior, anchor_scales,
                              scale_anchor);
}

}  // namespace

// Without autograd (inference mode, or below it): the forward alone.
Tensor adapted_linear(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& base_out, const Tensor& A, const Tensor& B,
                      const Tensor& scale, const OptTensor& row_index, const OptTensor& col_index,
                      at::IntArrayRef row_offsets, at::IntArrayRef col_offsets,
                      at::IntArrayRef ranks, bool dense_blocks, double dropout_p,
                      bool dropout_on_input, const OptTensor& ortho_lambda, int64_t num_experts,
                      double grad_A_multiplier, const OptTensor& gate_logits,
                      const OptTensor& gate_temperature, double uniform_prior,
                      const OptTensor& anchor_scales, double scale_anchor) {
  check_scale_terms(scale, row_index,
                    {gate_logits, gate_temperature, anchor_scales, uniform_prior, scale_anchor});
  const Tensor eff = gate_logits.has_value()
                         ? gated(scale, gate_of(*gate_logits, *gate_temperature).second)
                         : scale;
  return run_forward(x, weight, bias, base_out, A, B, eff, row_index, col_index, row_offsets,
                     col_offsets, ranks, dense_blocks, dropout_p, dropout_on_input)
      .out;
}

}  // namespace soslora

TORCH_LIBRARY_IMPL(soslora, Autograd, m) {
  m.impl("adapted_linear", &soslora::adapted_linear_autograd);
}
