// An adapted layer's training step as two ops: the forward, and the whole backward in one call
// (autograd.cpp makes them one autograd node). Device-generic: ATen calls, plus the CPU loops
// and CUDA kernels the shared pieces choose.
//
//   out = base + h (B s)^T,   h = D_post(D_in(x) A^T)
//   base: x W^T + bias (weight given: the base product in the same [N, out] buffer), or a
//         separate base's output (base_out), or nothing.
// Factors: A [r, in] and B [out, r] with scale [G] or [G, out], G dividing r (a scale per
// group of r/G ranks, and per output channel: per expert, or per rank when G = r); or
// CPS-LoRA's cluster blocks (`Layout`), placed into dense factors (blocks.cpp). The factors
// may have another dtype than x (float32 adapters on a bf16 base): they are cast to x's dtype
// here and their gradients returned in their own dtype.
#include "adapted_linear.h"
#include "dispatch.h"

#include <numeric>

namespace soslora {
namespace {

constexpr const char* kForward = "soslora::adapted_linear_forward";
constexpr const char* kBackward = "soslora::adapted_linear_backward";

// The scale shaped to multiply B viewed as [out, G, r/G]: [G, 1] or [out, G, 1].
Tensor group_view(const Tensor& scale, at::ScalarType acc) {
  const Tensor s = cast(scale, acc);
  return (s.dim() == 1 ? s : s.t()).unsqueeze(-1);
}

template <typename dst_t, typename src_t, typename acc_t>
void scale_groups_cpu(dst_t* out, const src_t* src, int64_t s0, int64_t s1, const acc_t* scale,
                      bool per_channel, int64_t rows, int64_t r, int64_t group) {
  parallel_rows(rows, r, [&](int64_t first, int64_t last) {
    for (int64_t o = first; o < last; ++o)
      for (int64_t g = 0, j = 0; j < r; ++g) {
        const acc_t s = scale[per_channel ? g * rows + o : g];
        for (const int64_t end = j + group; j < end; ++j)
          out[o * r + j] = static_cast<dst_t>(static_cast<acc_t>(src[o * s0 + j * s1]) * s);
      }
  });
}

// t [out, r] times the scale of each group of ranks (scale [G] or [G, out]) in t's
// accumulation dtype, rounded once to `dtype`: B * scale, and grad(B * scale) * scale. On the
// CPU one loop (no ATen op but the allocation).
Tensor scale_groups(const Tensor& t, const Tensor& scale, at::ScalarType dtype) {
  const auto acc = accumulate_dtype(t.scalar_type());
  const int64_t rows = t.size(0), G = scale.size(0), r = t.size(1);
  if (!t.is_cpu() || !scale.is_cpu() || cpu_takes_cuda_fallback())
    return cast((cast(t, acc).reshape({rows, G, r / G}) * group_view(scale, acc))
                    .view({rows, r}), dtype);
  Tensor out = at::empty({rows, r}, t.options().dtype(dtype));
  const Tensor s = cast(scale, acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_groups", [&] {
    using dst_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "scale", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scale_groups_cpu<dst_t, scalar_t, acc_t>(
          out.data_ptr<dst_t>(), t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1),
          s.const_data_ptr<acc_t>(), s.dim() == 2, rows, r, r / G);
    });
  });
  return out;
}

}  // namespace

void check_index_pair(const OptTensor& row_index, const OptTensor& col_index, const char* op) {
  TORCH_CHECK(!row_index.has_value() || col_index.has_value(), op, ": row_index needs col_index");
  TORCH_CHECK(!col_index.has_value() || row_index.has_value(), op, ": col_index needs row_index");
}

namespace {

void check_factors(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
                   const Layout& layout, const char* op) {
  check_matrix(A, "A", op);
  check_matrix(B, "B", op);
  for (const auto& [t, name] :
       {std::pair{&A, "A"}, std::pair{&B, "B"}, std::pair{&scale, "scale"}}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name,
                " must be floating-point, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
                ", got ", t->device());
  }
  TORCH_CHECK(A.size(1) == x.size(1), op, ": A must be [r, in] with in = x.size(1) = ", x.size(1),
              ", got A of shape ", A.sizes());
  TORCH_CHECK(B.size(1) == A.size(0), op, ": B must be [out, r] with r = A.size(0) = ", A.size(0),
              ", got B of shape ", B.sizes());
  check_index_pair(layout.row_index, layout.col_index, op);
  if (layout.blocks()) {
    check_cluster_layout(x, A, B, scale, *layout.row_index, *layout.col_index,
                         layout.row_offsets, layout.col_offsets, layout.ranks, op);
    return;
  }
  const int64_t r = A.size(0);
  const bool flat = scale.dim() == 1;
  const bool per_channel = scale.dim() == 2 && scale.size(1) == B.size(0);
  TORCH_CHECK((flat || per_channel) && scale.size(0) >= 1 && r % scale.size(0) == 0, op,
              ": scale must be [G] or [G, out] = [G, ", B.size(0), "] with G dividing r = ", r,
              " (one scale per group of r/G ranks), got ", scale.sizes());
}

}  // namespace

Factors dense_factors(const Tensor& A, const Tensor& B, const Tensor& scale,
                      const Layout& layout, at::ScalarType dtype) {
  return {dense_factors_A(A, layout, dtype),
          layout.blocks()
              ? place_blocks(B, *layout.row_index, layout.row_offsets, layout.ranks, scale, dtype)
              : scale_groups(B, scale, dtype)};
}

namespace {

// Everything the backward computes from grad_out besides the base's input gradient:
//   grad_hidden = D_post(grad_out Bs)  and, from the dense factors' gradient grad_outᵀ hidden,
//   grad_B (the cluster blocks gathered, or the group scale applied) and grad_scale.
// kernels() and aten() give the same results up to rounding (the kernel rounds each sum once).
struct OutputGrads {
  const Tensor& grad_out;
  const Tensor& hidden;
  const Tensor& scaled_B;
  const Tensor& B;
  const Tensor& scale;
  const Layout& layout;
  const OptTensor& dropout_seed;
  double p_post;  // the hidden's dropout, or 0
  bool need_hidden, need_B, need_scale;

  using Result = std::tuple<Tensor, Tensor, Tensor>;  // grad_hidden, grad_B, grad_scale

  // grad_B and grad_scale from the gradient of the dense B * scale (any floating dtype).
  std::pair<Tensor, Tensor> factor_grads(const Tensor& grad_Bs) const {
    if (layout.blocks())
      return {gather_blocks(grad_Bs, *layout.row_index, layout.row_offsets, layout.ranks,
                            B.size(1), scale, B.scalar_type()),
              Tensor()};
    Tensor grad_B, grad_scale;
    if (need_B) grad_B = scale_groups(grad_Bs, scale, B.scalar_type());
    if (need_scale) {
      const auto acc = accumulate_dtype(B.scalar_type());
      const int64_t out = B.size(0), G = scale.size(0), r = B.size(1);
      const Tensor g3 = cast(grad_Bs, acc).view({out, G, r / G});
      grad_scale = (g3 * cast(B, acc).view({out, G, r / G})).sum(-1);  // [out, G]
      grad_scale = scale.dim() == 1 ? grad_scale.sum(0) : grad_scale.t().contiguous();
      grad_scale = cast(grad_scale, scale.scalar_type());
    }
    return {grad_B, grad_scale};
  }

  Result aten() const {
    Tensor grad_hidden;
    if (need_hidden) {
      grad_hidden = grad_out.mm(scaled_B);
      if (p_post > 0) grad_hidden = dropout_apply(grad_hidden, dropout_seed, p_post);
    }
    if (!need_B && !need_scale) return {grad_hidden, Tensor(), Tensor()};
    auto [grad_B, grad_scale] = factor_grads(grad_out.t().mm(hidden));
    return {grad_hidden, grad_B, grad_scale};
  }

  Result kernels() const {
#ifdef SOSLORA_WITH_CUDA
    const auto dtype = grad_out.scalar_type(), acc = accumulate_dtype(dtype);
    const auto b_dtype = B.scalar_type();
    // grad_B straight from the kernel (scale and rounding in its epilogue) where its dtype
    // allows; else the unscaled sum in the accumulation dtype, finished as aten() does.
    if (need_B && !need_scale && !layout.blocks() && (b_dtype == dtype || b_dtype == acc)) {
      auto [grad_hidden, grad_B] = grad_hidden_and_B_cuda(
          grad_out, scaled_B, hidden, dropout_seed, p_post, need_hidden, true, scale, b_dtype);
      return {grad_hidden, grad_B, Tensor()};
    }
    const bool need_sum = need_B || need_scale;
    auto [grad_hidden, grad_Bs] = grad_hidden_and_B_cuda(
        grad_out, scaled_B, hidden, dropout_seed, p_post, need_hidden, need_sum, std::nullopt,
        acc);
    if (!need_sum) return {grad_hidden, Tensor(), Tensor()};
    auto [grad_B, grad_scale] = factor_grads(grad_Bs);
    return {grad_hidden, grad_B, grad_scale};
#else
    TORCH_INTERNAL_ASSERT(false, "soslora: built without the CUDA kernels");
    return {};
#endif
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> adapted_linear_forward(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& base_out,
    const Tensor& A, const Tensor& B, const Tensor& scale, const OptTensor& row_index,
    const OptTensor& col_index, at::IntArrayRef row_offsets, at::IntArrayRef col_offsets,
    at::IntArrayRef ranks, const OptTensor& dropout_seed, double dropout_p,
    bool dropout_on_input) {
  const char* op = kForward;
  const Layout layout{row_index, col_index, row_offsets, col_offsets, ranks};
  check_matrix(x, "x", op);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating-point, got ",
              x.scalar_type());
  check_factors(x, A, B, scale, layout, op);
  check_base_args(x, weight, bias, base_out, B.size(0), op);
  check_dropout(dropout_seed, dropout_p, x, op);

  const auto [A_c, Bs] = dense_factors(A, B, scale, layout, x.scalar_type());
  const Tensor hidden = lowrank_hidden(x, A_c, dropout_seed, dropout_p, dropout_on_input);
  Tensor out;
  if (weight.has_value()) {  // one [N, out] buffer: the base product, the adapter added into it
    out = bias.has_value() ? at::addmm(*bias, x, weight->t()) : at::mm(x, weight->t());
    out.addmm_(hidden, Bs.t());
  } else {
    out = base_out.has_value() ? at::addmm(*base_out, hidden, Bs.t()) : at::mm(hidden, Bs.t());
  }
  return {out, hidden, Bs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> adapted_linear_backward(
    const Tensor& grad_out, const Tensor& x, const OptTensor& weight, const Tensor& A,
    const Tensor& B, const Tensor& scale, const Tensor& hidden, const Tensor& scaled_B,
    const OptTensor& row_index, const OptTensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, const OptTensor& dropout_seed,
    double dropout_p, bool dropout_on_input, const OptTensor& ortho_lambda, int64_t num_experts,
    double grad_A_multiplier, std::array<bool, 4> output_mask) {
  const char* op = kBackward;
  const Layout layout{row_index, col_index, row_offsets, col_offsets, ranks};
  check_matrix(x, "x", op);
  check_factors(x, A, B, scale, layout, op);
  check_matrix(grad_out, "grad_out", op);
  check_matrix(hidden, "hidden", op);
  check_matrix(scaled_B, "scaled_B", op);
  check_same_float_dtype(grad_out, "grad_out", x, "x", op);
  check_same_float_dtype(hidden, "hidden", x, "x", op);
  check_same_float_dtype(scaled_B, "scaled_B", x, "x", op);
  // R: the dense factors' rank, r or the clusters' ranks summed.
  const int64_t R = layout.blocks() ? std::accumulate(ranks.begin(), ranks.end(), int64_t{0})
                                    : A.size(0);
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == B.size(0) &&
                  hidden.size(0) == x.size(0) && hidden.size(1) == R &&
                  scaled_B.size(0) == B.size(0) && scaled_B.size(1) == R,
              op, ": expected grad_out [N, out], hidden [N, R], scaled_B [out, R] with R = ", R,
              "; got ", grad_out.sizes(), ", ", hidden.sizes(), ", ", scaled_B.sizes());
  check_base_args(x, weight, std::nullopt, std::nullopt, B.size(0), op);
  check_dropout(dropout_seed, dropout_p, x, op);
  const auto [need_x, need_A, need_B, need_scale] = output_mask;
  TORCH_CHECK(!need_scale || !layout.blocks(), op, ": the cluster scales are fixed");

  // The base's input gradient first: the largest product, issued before the small ones.
  Tensor grad_x = need_x && weight.has_value() ? grad_out.mm(*weight) : Tensor();
  Tensor grad_A;
  const bool need_factors = need_x || need_A;
  const OutputGrads grads{grad_out, hidden, scaled_B, B, scale, layout, dropout_seed,
                          dropout_p > 0 && !dropout_on_input ? dropout_p : 0.0, need_factors,
                          need_B, need_scale};
  // The products over grad_out: one hand-written pass, or two cuBLAS products.
  auto [grad_hidden, grad_B, grad_scale] =
      dispatch("output_grads", grad_out,
               {grad_out.size(0), grad_out.size(1), hidden.size(1), grads.p_post > 0,
                need_factors, need_B + 2 * need_scale, layout.blocks()},
               [&] { return grads.kernels(); }, [&] { return grads.aten(); });
  if (need_factors) {
    const Tensor A_c = dense_factors_A(A, layout, x.scalar_type());
    const bool drop_in = dropout_p > 0 && dropout_on_input;
    Tensor grad_A_c;
    if (drop_in && need_x && need_A && dropout_cpu_loop(x) && x.is_contiguous()) {
      // Both input-side gradients from one mask draw.
      if (!grad_x.defined()) grad_x = at::zeros(x.sizes(), x.options());
      grad_A_c = input_dropout_grads_(grad_x, grad_hidden, A_c, x, *dropout_seed, dropout_p);
    } else {
      if (need_A) grad_A_c = lowrank_grad_A(grad_hidden, x, dropout_seed, dropout_p,
                                            dropout_on_input);
      if (need_x) {
        if (grad_x.defined())
          add_product_(grad_x, grad_hidden, A_c, dropout_seed, drop_in ? dropout_p : 0.0);
        else
          grad_x = lowrank_grad_x(grad_hidden, A_c, std::nullopt, dropout_seed, dropout_p,
                                  dropout_on_input);
      }
    }
    if (need_A) {
      grad_A = layout.blocks()
                   ? gather_blocks(grad_A_c.t(), *layout.col_index, layout.col_offsets,
                                   layout.ranks, A.size(0), std::nullopt, A.scalar_type(),
                                   /*transposed=*/true)
                   : cast(grad_A_c, A.scalar_type());
      add_A_gradient_terms_(grad_A, A, ortho_lambda, num_experts, grad_A_multiplier);
    }
  }
  if (!need_x) grad_x = Tensor();
  return {grad_x, grad_A, grad_B, grad_scale};
}

Tensor dense_factors_A(const Tensor& A, const Layout& layout, at::ScalarType dtype) {
  if (!layout.blocks()) return cast(A, dtype);
  // lora_A [r_max, in] is placed as its transpose: items are the input columns.
  return place_blocks(A.t(), *layout.col_index, layout.col_offsets, layout.ranks, std::nullopt,
                      dtype).t();
}

void add_A_gradient_terms_(Tensor& grad_A, const Tensor& A, const OptTensor& ortho_lambda,
                           int64_t num_experts, double grad_A_multiplier) {
  if (ortho_lambda.has_value() && num_experts > 1) {
    if (!grad_A.is_contiguous()) grad_A = grad_A.contiguous();
    ortho_penalty_grad_(grad_A, A, *ortho_lambda, num_experts);
  }
  if (grad_A_multiplier != 1.0) grad_A.mul_(grad_A_multiplier);
}

void check_base_args(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& base_out, int64_t out_features, const char* op) {
  TORCH_CHECK(!(weight.has_value() && base_out.has_value()), op,
              ": give the base as weight (and bias) or as base_out, not both");
  TORCH_CHECK(!bias.has_value() || weight.has_value(), op, ": bias needs weight");
  if (weight.has_value()) {
    check_matrix(*weight, "weight", op);
    check_same_float_dtype(*weight, "weight", x, "x", op);
    TORCH_CHECK(weight->size(0) == out_features && weight->size(1) == x.size(1), op,
                ": weight must be [out, in] = [", out_features, ", ", x.size(1), "], got ",
                weight->sizes());
  }
  if (bias.has_value()) {
    check_same_float_dtype(*bias, "bias", x, "x", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must be [out] = [",
                out_features, "], got ", bias->sizes());
  }
  if (base_out.has_value()) {
    check_same_float_dtype(*base_out, "base_out", x, "x", op);
    TORCH_CHECK(base_out->dim() == 2 && base_out->size(0) == x.size(0) &&
                    base_out->size(1) == out_features,
                op, ": base_out must be [N, out] = [", x.size(0), ", ", out_features, "], got ",
                base_out->sizes());
  }
}

Tensor dropout_seed(const Tensor& like) {
  if (like.is_cpu()) {
    // Drawn on the host from torch's CPU generator, as torch.randint(0, 2**62, (2,)) draws.
    auto* gen = at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
    Tensor seed = at::detail::empty_cpu({2}, at::kLong, std::nullopt, std::nullopt, std::nullopt,
                                        std::nullopt);
    auto* s = seed.data_ptr<int64_t>();
    std::lock_guard<std::mutex> lock(gen->mutex_);
    for (int i = 0; i < 2; ++i) s[i] = static_cast<int64_t>(gen->random64() % (1ULL << 62));
    return seed;
  }
  // A device generator's kernel: recorded in a CUDA graph, it draws anew at every replay.
  return at::randint(0, int64_t{1} << 62, {2}, like.options().dtype(at::kLong));
}

}  // namespace soslora
