// Cross-expert orthogonality penalty on the stacked input-side factor A = [A_1; ...; A_K]:
//   Â = rows of A normalized (as F.normalize, eps 1e-6, as the reference code),  G = Â Âᵀ with same-expert blocks zeroed,
//   penalty = sum(G²) / (K (K-1) r²),  r = rows per expert.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "adapted_linear.h"
#include "dispatch.h"

namespace soslora {
namespace {

constexpr double kNormEps = 1e-6;

void check_ortho_args(const Tensor& A, int64_t num_experts, const char* op) {
  TORCH_CHECK(A.dim() == 2, op, ": A must be 2-D [r_tot, in], got shape ", A.sizes());
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), op, ": A must be floating-point, got ",
              A.scalar_type());
  TORCH_CHECK(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(A.size(0) % num_experts == 0, op, ": A.size(0) = ", A.size(0),
              " must be divisible by num_experts = ", num_experts);
}

struct Gram {
  Tensor A_hat;   // [r_tot, in] rows normalized
  Tensor norms;   // [r_tot, 1] row norms before clamping
  Tensor G;       // [r_tot, r_tot] cross-expert Gram (same-expert blocks zero)
  double denom;   // K (K-1) r²
};

Gram cross_gram(const Tensor& A, int64_t num_experts) {
  const auto acc = accumulate_dtype(A.scalar_type());
  const Tensor A_acc = A.to(acc);
  const int64_t r_tot = A.size(0), r = r_tot / num_experts;
  Tensor norms = A_acc.norm(2, {1}, /*keepdim=*/true);
  Tensor A_hat = A_acc / norms.clamp_min(kNormEps);
  const Tensor expert = at::arange(r_tot, A.options().dtype(at::kLong)).div(r, "floor");
  const Tensor cross = expert.unsqueeze(1).ne(expert.unsqueeze(0)).to(acc);
  Tensor G = at::mm(A_hat, A_hat.t()) * cross;
  const double k = static_cast<double>(num_experts);
  return {A_hat, norms, G, k * (k - 1) * static_cast<double>(r * r)};
}

void check_ortho_penalty_grad_args(const Tensor& grad_A, const Tensor& A, const Tensor& weight,
                                   int64_t num_experts) {
  constexpr const char* op = "soslora::ortho_penalty_grad_";
  check_ortho_args(A, num_experts, op);
  TORCH_CHECK(grad_A.sizes() == A.sizes(), op, ": grad_A must have A's shape ", A.sizes(),
              ", got ", grad_A.sizes());
  TORCH_CHECK(grad_A.device() == A.device() && weight.device() == A.device(), op,
              ": grad_A, A and weight must be on one device, got ", grad_A.device(), ", ",
              A.device(), ", ", weight.device());
  TORCH_CHECK(at::isFloatingType(grad_A.scalar_type()), op,
              ": grad_A must be floating-point, got ", grad_A.scalar_type());
  TORCH_CHECK(weight.numel() == 1 && at::isFloatingType(weight.scalar_type()), op,
              ": weight must be a floating-point tensor with one element, got ",
              weight.scalar_type(), " of shape ", weight.sizes());
}


double read_scalar(const Tensor& t) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "read_scalar", [&] {
    v = static_cast<double>(*t.const_data_ptr<scalar_t>());
  });
  return v;
}

// The same gradient on the CPU with two ATen ops (G = Â Âᵀ, then G Â, into host scratch
// buffers); the row norms, the same-expert blocks and the projection through the
// normalization are loops.
void ortho_penalty_grad_cpu_(Tensor& grad_A, const Tensor& A, double lam, int64_t num_experts) {
  const Tensor A_c = A.contiguous();
  const int64_t rows = A.size(0), cols = A.size(1), r = rows / num_experts;
  const auto acc = accumulate_dtype(A.scalar_type());
  const double k = static_cast<double>(num_experts);
  const double coef = 4.0 / (k * (k - 1) * static_cast<double>(r * r));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "ortho_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = A_c.const_data_ptr<scalar_t>();
    // Scratch buffers on the host, wrapped without an allocating op.
    std::vector<acc_t> h_buf(rows * cols), gram(rows * rows), ga_buf(rows * cols), norms(rows);
    const auto wrap = [&](std::vector<acc_t>& v, int64_t n, int64_t m) {
      return at::from_blob(v.data(), {n, m}, A.options().dtype(acc));
    };
    const Tensor A_hat = wrap(h_buf, rows, cols);
    acc_t* h = h_buf.data();
    parallel_rows(rows, cols, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        acc_t sq = 0;
        for (int64_t j = 0; j < cols; ++j)
          sq += static_cast<acc_t>(a[i * cols + j]) * static_cast<acc_t>(a[i * cols + j]);
        norms[i] = std::sqrt(sq);
        const acc_t inv = acc_t(1) / std::max(norms[i], static_cast<acc_t>(kNormEps));
        for (int64_t j = 0; j < cols; ++j)
          h[i * cols + j] = static_cast<acc_t>(a[i * cols + j]) * inv;
      }
    });
    acc_t* gm = gram.data();
    acc_t* ga = ga_buf.data();
    Tensor G = wrap(gram, rows, rows), GA = wrap(ga_buf, rows, cols);
    at::mm_out(G, A_hat, A_hat.t());
    for (int64_t i = 0; i < rows; ++i)  // same-expert blocks do not count
      std::fill(gm + i * rows + (i / r) * r, gm + i * rows + (i / r + 1) * r, acc_t(0));
    at::mm_out(GA, G, A_hat);
    scalar_t* out = grad_A.data_ptr<scalar_t>();
    const acc_t c = static_cast<acc_t>(coef), l = static_cast<acc_t>(lam);
    parallel_rows(rows, cols, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        acc_t radial = 0;
        for (int64_t j = 0; j < cols; ++j) radial += h[i * cols + j] * (ga[i * cols + j] * c);
        const bool above = norms[i] > static_cast<acc_t>(kNormEps);
        const acc_t inv = acc_t(1) / (above ? norms[i] : static_cast<acc_t>(kNormEps));
        for (int64_t j = 0; j < cols; ++j) {
          const acc_t grad_hat = ga[i * cols + j] * c;
          const acc_t g = above ? (grad_hat - h[i * cols + j] * radial) * inv : grad_hat * inv;
          out[i * cols + j] =
              static_cast<scalar_t>(static_cast<acc_t>(out[i * cols + j]) + g * l);
        }
      }
    });
  });
}

}  // namespace

Tensor ortho_penalty(const Tensor& A, int64_t num_experts) {
  check_ortho_args(A, num_experts, "soslora::ortho_penalty");
  const auto acc = accumulate_dtype(A.scalar_type());
  if (num_experts == 1 || A.size(0) == 0) return at::zeros({}, A.options().dtype(acc));
  const Gram g = cross_gram(A, num_experts);
  return g.G.square().sum() / g.denom;
}


namespace {

// grad_A += weight * d penalty / dA in ATen: the Gram matrix, its gradient, then back through
// the normalization, added in the accumulation type and rounded once, as the CUDA kernel does.
void ortho_penalty_grad_aten_(at::Tensor& grad_A, const Tensor& A, const Tensor& weight,
                              int64_t num_experts) {
  const c10::NoGradGuard no_grad;  // updates a gradient or frozen weight: not differentiable
  const Gram g = cross_gram(A, num_experts);
  // d/dÂ sum(G²) = 4 G Â (G symmetric); then through Â = A / max(|A|, eps).
  const Tensor grad_hat = at::mm(g.G, g.A_hat) * (4.0 / g.denom);
  const Tensor radial = (g.A_hat * grad_hat).sum(1, /*keepdim=*/true);
  const Tensor above = g.norms.gt(kNormEps);
  const Tensor grad = at::where(above, (grad_hat - g.A_hat * radial) / g.norms.clamp_min(kNormEps),
                                grad_hat / kNormEps);
  const Tensor update = grad * weight.reshape({}).to(grad.scalar_type());
  if (grad_A.scalar_type() == update.scalar_type())
    grad_A.add_(update);
  else
    grad_A.copy_(grad_A.to(update.scalar_type()).add_(update));
}

}  // namespace

void ortho_penalty_grad_(at::Tensor& grad_A, const Tensor& A, const Tensor& weight,
                         int64_t num_experts) {
  check_ortho_penalty_grad_args(grad_A, A, weight, num_experts);
  if (num_experts == 1 || A.size(0) == 0) return;
#ifdef SOSLORA_WITH_CUDA
  if (grad_A.scalar_type() == A.scalar_type() && grad_A.is_contiguous()) {
    Tensor scratch;  // the trials add into a copy: grad_A is added to once
    const Impl impl = choose_impl(
        "ortho_penalty_grad", A, {A.size(0), A.size(1), num_experts}, [&](Impl trial) {
          if (!scratch.defined()) scratch = grad_A.clone();
          if (trial == Impl::kKernel) ortho_penalty_grad_cuda_(scratch, A, weight, num_experts);
          else ortho_penalty_grad_aten_(scratch, A, weight, num_experts);
        });
    if (impl == Impl::kKernel) return ortho_penalty_grad_cuda_(grad_A, A, weight, num_experts);
  }
#endif
  if (weight.is_cpu()) {
    // λ = 0 (a schedule's warm-up) adds nothing. Only a CPU weight is read here: reading a CUDA
    // one would sync the host (the CUDA kernels skip their work on the device instead).
    const double lam = read_scalar(weight);
    if (lam == 0.0) return;
    if (A.is_cpu() && grad_A.is_cpu() && grad_A.is_contiguous() &&
        grad_A.scalar_type() == A.scalar_type() && !cpu_takes_cuda_fallback())
      return ortho_penalty_grad_cpu_(grad_A, A, lam, num_experts);
  }
  ortho_penalty_grad_aten_(grad_A, A, weight, num_experts);
}

}  // namespace soslora
