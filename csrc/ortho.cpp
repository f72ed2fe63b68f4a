// Cross-expert orthogonality penalty on the stacked input-side factor A = [A_1; ...; A_K]:
//   Â = rows of A normalized (as F.normalize, eps 1e-6, as the reference code),  G = Â Âᵀ with same-expert blocks zeroed,
//   penalty = sum(G²) / (K (K-1) r²),  r = rows per expert.
#include "soslora.h"

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

}  // namespace

Tensor ortho_penalty(const Tensor& A, int64_t num_experts) {
  check_ortho_args(A, num_experts, "soslora::ortho_penalty");
  const auto acc = accumulate_dtype(A.scalar_type());
  if (num_experts == 1 || A.size(0) == 0) return at::zeros({}, A.options().dtype(acc));
  const Gram g = cross_gram(A, num_experts);
  return g.G.square().sum() / g.denom;
}


void ortho_penalty_grad_(at::Tensor& grad_A, const Tensor& A, const Tensor& weight,
                         int64_t num_experts) {
  check_ortho_penalty_grad_args(grad_A, A, weight, num_experts);
  if (num_experts == 1 || A.size(0) == 0) return;
#ifdef SOSLORA_WITH_CUDA
  if (have_cuda_kernels(A) && cuda_path() != CudaPath::kAten &&
      grad_A.scalar_type() == A.scalar_type() && grad_A.is_contiguous())
    return ortho_penalty_grad_cuda_(grad_A, A, weight, num_experts);
#endif
  // λ = 0 (a schedule's warm-up) adds nothing. Only a CPU weight is read here: reading a CUDA one
  // would sync the host (the CUDA kernels skip their work on the device instead).
  if (weight.is_cpu() && weight.item<double>() == 0.0) return;
  const c10::NoGradGuard no_grad;  // updates a gradient or frozen weight: not differentiable
  const Gram g = cross_gram(A, num_experts);
  // d/dÂ sum(G²) = 4 G Â (G symmetric); then through Â = A / max(|A|, eps).
  const Tensor grad_hat = at::mm(g.G, g.A_hat) * (4.0 / g.denom);
  const Tensor radial = (g.A_hat * grad_hat).sum(1, /*keepdim=*/true);
  const Tensor above = g.norms.gt(kNormEps);
  const Tensor grad = at::where(above, (grad_hat - g.A_hat * radial) / g.norms.clamp_min(kNormEps),
                                grad_hat / kNormEps);
  // Added in the accumulation type and rounded once, as the CUDA kernel does.
  const Tensor update = grad * weight.reshape({}).to(grad.scalar_type());
  if (grad_A.scalar_type() == update.scalar_type())
    grad_A.add_(update);
  else
    grad_A.copy_(grad_A.to(update.scalar_type()).add_(update));
}

}  // namespace soslora
