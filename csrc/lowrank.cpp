// The low-rank adapter path, forward and the pieces of its backward.
//
//   post-dropout ("post"): h = drop(x A^T),   out = base_out + h (B*s)^T
//   pre-dropout  ("pre"):  h = drop(x) A^T,   out = base_out + h (B*s)^T
//
// x: [N, in], A: [r, in], B: [out, r], s: [r] or [out, r]. Experts (and later clusters or
// summed adapters) are contiguous segments of the r axis; their scales live in s.
// Written with ATen calls so the same code serves the CPU and CUDA dispatch keys.
#include "dispatch.h"
#include "soslora.h"

namespace soslora {

void check_same_float_dtype(const Tensor& a, const char* a_name, const Tensor& b,
                            const char* b_name, const char* op) {
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": ", a_name,
              " must be a floating-point tensor, got ", a.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

void check_matrix(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

// A [r, in], B [out, r] and scale for the 2-D input x.
void check_lowrank_factors(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
                           const char* op) {
  check_matrix(A, "A", op);
  check_matrix(B, "B", op);
  check_same_float_dtype(x, "x", A, "A", op);
  check_same_float_dtype(x, "x", B, "B", op);
  TORCH_CHECK(A.size(1) == x.size(1), op, ": A must be [r, in] with in = x.size(1) = ", x.size(1),
              ", got A of shape ", A.sizes());
  TORCH_CHECK(B.size(1) == A.size(0), op, ": B must be [out, r] with r = A.size(0) = ", A.size(0),
              ", got B of shape ", B.sizes());
  check_scale(scale, B, op);
}

std::tuple<Tensor, Tensor> lowrank_forward(const Tensor& x, const Tensor& A, const Tensor& B,
                                           const Tensor& scale, const OptTensor& base_out,
                                           const OptTensor& dropout_seed, double dropout_p,
                                           bool dropout_on_input) {
  constexpr const char* op = "soslora::lowrank_forward";
  check_matrix(x, "x", op);
  check_lowrank_factors(x, A, B, scale, op);
  if (base_out.has_value()) {
    check_same_float_dtype(*base_out, "base_out", x, "x", op);
    TORCH_CHECK(base_out->dim() == 2 && base_out->size(0) == x.size(0) &&
                    base_out->size(1) == B.size(0),
                op, ": base_out must be [N, out] = [", x.size(0), ", ", B.size(0), "], got ",
                base_out->sizes());
  }
  check_dropout(dropout_seed, dropout_p, x, op);

  const Tensor hidden = lowrank_hidden(x, A, dropout_seed, dropout_p, dropout_on_input);
  const Tensor Bs_t = scaled_B(B, scale).t();
  Tensor out = base_out.has_value() ? at::addmm(*base_out, hidden, Bs_t) : at::mm(hidden, Bs_t);
  return {out, hidden};
}

std::tuple<Tensor, Tensor> linear_lowrank_forward(const Tensor& x, const Tensor& weight,
                                                  const OptTensor& bias, const Tensor& A,
                                                  const Tensor& B, const Tensor& scale,
                                                  const OptTensor& dropout_seed, double dropout_p,
                                                  bool dropout_on_input) {
  constexpr const char* op = "soslora::linear_lowrank_forward";
  check_matrix(x, "x", op);
  check_matrix(weight, "weight", op);
  check_same_float_dtype(x, "x", weight, "weight", op);
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must be [out, in] with in = x.size(1) = ",
              x.size(1), ", got weight of shape ", weight.sizes());
  if (bias.has_value()) {
    check_same_float_dtype(*bias, "bias", x, "x", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be [out] = [", weight.size(0), "], got ", bias->sizes());
  }
  check_lowrank_factors(x, A, B, scale, op);
  TORCH_CHECK(B.size(0) == weight.size(0), op, ": B must be [out, r] with out = weight.size(0) = ",
              weight.size(0), ", got B of shape ", B.sizes());
  check_dropout(dropout_seed, dropout_p, x, op);

  // One [N, out] buffer: the base product, then the adapter added into it in place.
  Tensor out = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  const Tensor hidden = lowrank_hidden(x, A, dropout_seed, dropout_p, dropout_on_input);
  add_product_(out, hidden, scaled_B(B, scale).t(), std::nullopt, 0.0);
  return {out, hidden};
}

Tensor lowrank_hidden(const Tensor& x, const Tensor& A, const OptTensor& dropout_seed,
                      double dropout_p, bool dropout_on_input) {
  const bool drop = dropout_p > 0;
  const auto library = [&] {
    const Tensor x_in = (drop && dropout_on_input) ? dropout_apply(x, dropout_seed, dropout_p) : x;
    const Tensor hidden = at::mm(x_in, A.t());
    return (drop && !dropout_on_input) ? dropout_apply(hidden, dropout_seed, dropout_p) : hidden;
  };
#ifdef SOSLORA_WITH_CUDA
  return dispatch(
      "lowrank_hidden", x, {x.size(0), x.size(1), A.size(0), drop + dropout_on_input},
      [&] { return lowrank_hidden_cuda(x, A, dropout_seed, dropout_p, dropout_on_input); },
      library);
#else
  return library();
#endif
}

void add_product_(Tensor& out, const Tensor& left, const Tensor& right,
                  const OptTensor& dropout_seed, double dropout_p) {
  const auto library = [&](Tensor& into) {
    if (dropout_p > 0)
      dropout_add_(into, at::mm(left, right), dropout_seed, dropout_p);
    else
      into.addmm_(left, right);
  };
#ifdef SOSLORA_WITH_CUDA
  Tensor scratch;  // the trials add into a copy: out is added to once
  const Impl impl = choose_impl(
      "add_product", out, {out.size(0), out.size(1), left.size(1), dropout_p > 0},
      [&](Impl trial) {
        if (!scratch.defined()) scratch = out.clone();
        if (trial == Impl::kKernel) add_product_cuda_(scratch, left, right, dropout_seed, dropout_p);
        else library(scratch);
      });
  if (impl == Impl::kKernel) return add_product_cuda_(out, left, right, dropout_seed, dropout_p);
#endif
  library(out);
}

std::tuple<Tensor, Tensor, Tensor> lowrank_grad_hidden(const Tensor& grad_out, const Tensor& B,
                                                       const Tensor& scale, const Tensor& hidden,
                                                       const OptTensor& dropout_seed,
                                                       double dropout_p, bool dropout_on_input) {
  constexpr const char* op = "soslora::lowrank_grad_hidden";
  check_matrix(grad_out, "grad_out", op);
  check_matrix(B, "B", op);
  check_matrix(hidden, "hidden", op);
  check_same_float_dtype(grad_out, "grad_out", B, "B", op);
  check_same_float_dtype(grad_out, "grad_out", hidden, "hidden", op);
  TORCH_CHECK(grad_out.size(1) == B.size(0) && hidden.size(0) == grad_out.size(0) &&
                  hidden.size(1) == B.size(1),
              op, ": expected grad_out [N, out], B [out, r], hidden [N, r]; got ",
              grad_out.sizes(), ", ", B.sizes(), ", ", hidden.sizes());
  check_scale(scale, B, op);
  check_dropout(dropout_seed, dropout_p, grad_out, op);

  // The gradients of the hidden and of B * scale ([out, r], then split between the factors).
  const double p_post = dropout_p > 0 && !dropout_on_input ? dropout_p : 0.0;
  const Tensor Bs = scaled_B(B, scale);
  const auto library = [&] {
    Tensor grad_hidden = at::mm(grad_out, Bs);
    if (p_post > 0) grad_hidden = dropout_apply(grad_hidden, dropout_seed, p_post);
    return std::make_tuple(grad_hidden, at::mm(grad_out.t(), hidden));
  };
#ifdef SOSLORA_WITH_CUDA
  // One pass over grad_out for both; grad_Bs in the accumulation dtype.
  auto [grad_hidden, grad_Bs] = dispatch(
      "lowrank_grad_hidden", grad_out,
      {grad_out.size(0), grad_out.size(1), hidden.size(1), p_post > 0},
      [&] {
        auto [gh, gb] = grad_hidden_and_B_cuda(grad_out, Bs, hidden, dropout_seed, p_post, true,
                                               true, std::nullopt,
                                               accumulate_dtype(grad_out.scalar_type()));
        return std::make_tuple(gh, gb);
      },
      library);
#else
  auto [grad_hidden, grad_Bs] = library();
#endif

  const auto acc = accumulate_dtype(B.scalar_type());
  const Tensor grad_Bs_acc = grad_Bs.to(acc);
  Tensor grad_B = (grad_Bs_acc * scale.to(acc)).to(B.scalar_type());
  Tensor grad_scale = grad_Bs_acc * B.to(acc);
  if (scale.dim() == 1) grad_scale = grad_scale.sum(0);
  return {grad_hidden, grad_B, grad_scale.to(scale.scalar_type())};
}

Tensor lowrank_grad_A(const Tensor& grad_hidden, const Tensor& x, const OptTensor& dropout_seed,
                      double dropout_p, bool dropout_on_input) {
  constexpr const char* op = "soslora::lowrank_grad_A";
  check_matrix(grad_hidden, "grad_hidden", op);
  check_matrix(x, "x", op);
  check_same_float_dtype(grad_hidden, "grad_hidden", x, "x", op);
  TORCH_CHECK(grad_hidden.size(0) == x.size(0), op,
              ": grad_hidden [N, r] and x [N, in] must share N, got ", grad_hidden.sizes(),
              " and ", x.sizes());
  check_dropout(dropout_seed, dropout_p, x, op);
  const bool drop_x = dropout_p > 0 && dropout_on_input;
  const auto library = [&] {
    const Tensor x_in = drop_x ? dropout_apply(x, dropout_seed, dropout_p) : x;
    return at::mm(grad_hidden.t(), x_in);
  };
#ifdef SOSLORA_WITH_CUDA
  return dispatch(
      "lowrank_grad_A", x, {x.size(0), x.size(1), grad_hidden.size(1), drop_x},
      [&] { return lowrank_grad_A_cuda(grad_hidden, x, dropout_seed, drop_x ? dropout_p : 0.0); },
      library);
#else
  return library();
#endif
}

Tensor lowrank_grad_x(const Tensor& grad_hidden, const Tensor& A, const OptTensor& grad_x_base,
                      const OptTensor& dropout_seed, double dropout_p, bool dropout_on_input) {
  constexpr const char* op = "soslora::lowrank_grad_x";
  check_matrix(grad_hidden, "grad_hidden", op);
  check_matrix(A, "A", op);
  check_same_float_dtype(grad_hidden, "grad_hidden", A, "A", op);
  TORCH_CHECK(grad_hidden.size(1) == A.size(0), op,
              ": grad_hidden [N, r] and A [r, in] must share r, got ", grad_hidden.sizes(),
              " and ", A.sizes());
  check_dropout(dropout_seed, dropout_p, grad_hidden, op);
  const double p_in = dropout_on_input ? dropout_p : 0.0;
  if (!grad_x_base.has_value())
    return p_in > 0 ? dropout_apply(at::mm(grad_hidden, A), dropout_seed, p_in)
                    : at::mm(grad_hidden, A);
  check_same_float_dtype(*grad_x_base, "grad_x_base", grad_hidden, "grad_hidden", op);
  TORCH_CHECK(grad_x_base->dim() == 2 && grad_x_base->size(0) == grad_hidden.size(0) &&
                  grad_x_base->size(1) == A.size(1),
              op, ": grad_x_base must be [N, in] = [", grad_hidden.size(0), ", ", A.size(1),
              "], got ", grad_x_base->sizes());
  Tensor grad_x = grad_x_base->clone(at::MemoryFormat::Contiguous);
  add_product_(grad_x, grad_hidden, A, dropout_seed, p_in);
  return grad_x;
}

Tensor input_dropout_grads_(Tensor& grad_x, const Tensor& grad_hidden, const Tensor& A,
                            const Tensor& x, const Tensor& dropout_seed, double dropout_p) {
  constexpr const char* op = "soslora::input_dropout_grads_";
  check_matrix(grad_x, "grad_x", op);
  check_matrix(grad_hidden, "grad_hidden", op);
  check_matrix(A, "A", op);
  check_matrix(x, "x", op);
  check_same_float_dtype(grad_x, "grad_x", x, "x", op);
  check_same_float_dtype(grad_hidden, "grad_hidden", x, "x", op);
  check_same_float_dtype(A, "A", x, "x", op);
  TORCH_CHECK(grad_x.sizes() == x.sizes() && grad_hidden.size(0) == x.size(0) &&
                  grad_hidden.size(1) == A.size(0) && A.size(1) == x.size(1),
              op, ": expected grad_x [N, in], grad_hidden [N, r], A [r, in], x [N, in]; got ",
              grad_x.sizes(), ", ", grad_hidden.sizes(), ", ", A.sizes(), ", ", x.sizes());
  check_dropout(dropout_seed, dropout_p, x, op);
  if (dropout_p == 0 || !dropout_cpu_loop(grad_x)) {
    add_product_(grad_x, grad_hidden, A, dropout_seed, dropout_p);
    return lowrank_grad_A(grad_hidden, x, dropout_seed, dropout_p, true);
  }
  // One [N, in] temporary: grad_hidden A, added (dropped) into grad_x, then overwritten by
  // the dropped input that grad_A needs.
  Tensor product = at::mm(grad_hidden, A);
  dropout_add_and_apply_(grad_x, product, x, dropout_seed, dropout_p);
  return at::mm(grad_hidden.t(), product);
}

Tensor linear_lowrank_grad_x(const Tensor& grad_out, const Tensor& weight,
                             const Tensor& grad_hidden, const Tensor& A,
                             const OptTensor& dropout_seed, double dropout_p,
                             bool dropout_on_input) {
  constexpr const char* op = "soslora::linear_lowrank_grad_x";
  check_matrix(grad_out, "grad_out", op);
  check_matrix(weight, "weight", op);
  check_matrix(grad_hidden, "grad_hidden", op);
  check_matrix(A, "A", op);
  check_same_float_dtype(grad_out, "grad_out", weight, "weight", op);
  check_same_float_dtype(grad_out, "grad_out", grad_hidden, "grad_hidden", op);
  check_same_float_dtype(grad_out, "grad_out", A, "A", op);
  TORCH_CHECK(grad_out.size(1) == weight.size(0) && grad_hidden.size(0) == grad_out.size(0) &&
                  grad_hidden.size(1) == A.size(0) && A.size(1) == weight.size(1),
              op, ": expected grad_out [N, out], weight [out, in], grad_hidden [N, r], A [r, in]; "
              "got ", grad_out.sizes(), ", ", weight.sizes(), ", ", grad_hidden.sizes(), ", ",
              A.sizes());
  check_dropout(dropout_seed, dropout_p, grad_out, op);
  // One [N, in] buffer: the base's input gradient, then the adapter's added into it in place.
  Tensor grad_x = at::mm(grad_out, weight);
  add_product_(grad_x, grad_hidden, A, dropout_seed, dropout_on_input ? dropout_p : 0.0);
  return grad_x;
}

Tensor scaled_B(const Tensor& B, const Tensor& scale) {
  const auto acc = accumulate_dtype(B.scalar_type());
  return (B.to(acc) * scale.to(acc)).to(B.scalar_type());
}

void check_scale(const Tensor& scale, const Tensor& B, const char* op) {
  const int64_t out_features = B.size(0), rank = B.size(1);
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), op,
              ": scale must be a floating-point tensor, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == B.device(), op, ": scale must be on B's device ", B.device(),
              ", got ", scale.device());
  const bool per_rank = scale.dim() == 1 && scale.size(0) == rank;
  const bool per_channel = scale.dim() == 2 && scale.size(0) == out_features && scale.size(1) == rank;
  TORCH_CHECK(per_rank || per_channel, op, ": scale must be [r] = [", rank, "] or [out, r] = [",
              out_features, ", ", rank, "], got ", scale.sizes());
}

}  // namespace soslora
