// In-place merge of a low-rank update into a weight: weight += alpha * (B * scale) @ A,
// accumulated in float32 (float64 for float64 weights or factors) and rounded once into
// weight's dtype; the CUDA kernel where it serves the device, ATen otherwise.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include "soslora.h"

namespace soslora {
namespace {

void check_merge_args(const Tensor& weight, const Tensor& A, const Tensor& B,
                      const Tensor& scale) {
  constexpr const char* op = "soslora::merge_into_";
  TORCH_CHECK(weight.dim() == 2 && A.dim() == 2 && B.dim() == 2, op,
              ": weight [out, in], A [r, in] and B [out, r] must be 2-D, got ", weight.sizes(),
              ", ", A.sizes(), ", ", B.sizes());
  TORCH_CHECK(A.size(1) == weight.size(1) && B.size(0) == weight.size(0) &&
                  B.size(1) == A.size(0),
              op, ": shapes do not chain: weight ", weight.sizes(), ", A ", A.sizes(), ", B ",
              B.sizes(), " (expected weight [out, in], A [r, in], B [out, r])");
  for (const Tensor* t : {&weight, &A, &B})
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op,
                ": weight, A and B must be floating-point, got ", t->scalar_type());
  TORCH_CHECK(A.device() == weight.device() && B.device() == weight.device(), op,
              ": weight, A and B must be on one device, got ", weight.device(), ", ", A.device(),
              ", ", B.device());
  check_scale(scale, B, op);
  // An expanded or self-overlapping weight would receive several updates per memory location
  // (racing on CUDA): refused on every device.
  TORCH_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes, op,
              ": weight has elements that share memory (an expanded or overlapping view, strides ",
              weight.strides(), "); merge into a tensor that owns its elements");
}

}  // namespace

void merge_into_(at::Tensor& weight, const Tensor& A, const Tensor& B, const Tensor& scale,
                 double alpha) {
  check_merge_args(weight, A, B, scale);
#ifdef SOSLORA_WITH_CUDA
  if (have_cuda_kernels(weight)) return merge_into_cuda_(weight, A, B, scale, alpha);
#endif
  const c10::NoGradGuard no_grad;  // updates a gradient or frozen weight: not differentiable
  const auto acc = at::promote_types(accumulate_dtype(weight.scalar_type()),
                                     at::promote_types(A.scalar_type(), B.scalar_type()));
  const Tensor A_acc = A.to(acc);
  const Tensor Bs_acc = B.to(acc) * scale.to(acc);
  // A band of rows at a time: the update D = (B * scale) @ A is formed on its own, then added
  // in `acc` and rounded once into the weight. (addmm with beta = 1 may add the weight in
  // mid-sum, which rounds more than once.) The same inputs give bit for bit the same D, so
  // alpha = -1 subtracts exactly what alpha = 1 added. Bands of about 128K elements keep D in
  // the cache (no [out, in] temporary, so the weight is read and written once, as addmm_
  // does), and run on all threads.
  const int64_t rows = weight.size(0), cols = std::max<int64_t>(weight.size(1), 1);
  const int64_t band = std::max<int64_t>(1, (int64_t{1} << 17) / cols);
  const int64_t bands = (rows + band - 1) / band;
  at::parallel_for(0, bands, 1, [&](int64_t first, int64_t last) {
    const c10::NoGradGuard no_grad_here;  // grad mode is per thread
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * band, n = std::min(band, rows - start);
      Tensor w = weight.narrow(0, start, n);
      const Tensor delta = at::mm(Bs_acc.narrow(0, start, n), A_acc);
      if (w.scalar_type() == acc) {
        w.add_(delta, alpha);
      } else {
        w.copy_(w.to(acc).add_(delta, alpha));
      }
    }
  });
}

}  // namespace soslora
