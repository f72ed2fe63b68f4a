// In-place merge of a low-rank update into a weight, weight += alpha * (B * scale) @ A,
// accumulated in float32 (float64 for float64 weights or factors) and rounded once into the
// weight's dtype, and the weight's stats (fingerprint, max|w|) gathered in the same pass; the
// read-only weight_stats. The CUDA kernels where they serve the device, a CPU loop on the CPU,
// ATen otherwise (soslora.h describes the stats).
#include <ATen/MemoryOverlap.h>

#include <bit>
#include <limits>

#include "merge_cpu.h"

namespace soslora {

using lines::Geometry;

Geometry geometry_of(const Tensor& w) {
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t row_step = cols > 1 ? w.stride(1) : 1, col_step = rows > 1 ? w.stride(0) : 1;
  const bool pairs = w.element_size() == 2 && cols % 2 == 0;
  if (row_step == 1 && (col_step != 1 || cols >= rows))
    return {true, pairs, rows, cols, w.stride(0), 1};
  if (col_step == 1) return {false, pairs, cols, rows, w.stride(1), 1};
  return {true, pairs, rows, cols, w.stride(0), w.stride(1)};
}

Tensor stats_of(uint64_t row_sum, uint64_t col_sum, double max_abs, int64_t count) {
  Tensor stats = at::empty({4}, at::TensorOptions().dtype(at::kLong));
  int64_t* s = stats.data_ptr<int64_t>();
  s[0] = static_cast<int64_t>(row_sum);
  s[1] = static_cast<int64_t>(col_sum);
  s[2] = std::bit_cast<int64_t>(max_abs);
  s[3] = count;
  return stats;
}

namespace {

bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_weight(const Tensor& weight, const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be a 2-D [out, in] matrix, got shape ",
              weight.sizes());
  TORCH_CHECK(is_weight_dtype(weight.scalar_type()), op,
              ": weight must be float32, float64, float16 or bfloat16, got ",
              weight.scalar_type());
}

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
  check_weight(weight, op);
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

double limit_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 65504.0;
    case at::kBFloat16: return double(std::numeric_limits<c10::BFloat16>::max());
    case at::kFloat: return double(std::numeric_limits<float>::max());
    default: return std::numeric_limits<double>::max();
  }
}

// ---- ATen, on any device: the CUDA path without the kernels --------------------------------
// sharing.fingerprint's formula in integer ops.
Tensor weight_stats_aten(const Tensor& w) {
  const auto size = w.element_size();
  const auto word = size == 8 ? at::kLong : at::kInt;
  const bool pairs = size == 2 && w.size(1) % 2 == 0;
  const Tensor bits = pairs ? w.contiguous().view(at::kInt)
                            : w.view(size == 8 ? at::kLong : size == 4 ? at::kInt : at::kShort);
  Tensor sums[2];
  for (int dim = 1; dim >= 0; --dim) {
    const Tensor line_sums = bits.sum(dim, false, word);
    const Tensor odd = at::arange(1, 2 * line_sums.numel(), 2, line_sums.options());
    sums[1 - dim] = (line_sums * odd).sum(word).to(at::kLong);
    if (size != 8) sums[1 - dim] = sums[1 - dim].bitwise_and(int64_t{0xFFFFFFFF});
  }
  const Tensor count = at::isfinite(w).logical_not().sum().to(at::kLong);
  const Tensor max_abs = at::where(count > 0, std::numeric_limits<double>::infinity(),
                                   w.abs().amax().to(at::kDouble));
  return at::stack({sums[0], sums[1], max_abs.view(at::kLong), count});
}

// Checks every sum first (nothing is written if one leaves the range), then writes, then reads
// the stats: not the fast path, but the CPU loop's arithmetic, bit for bit.
Tensor merge_aten(Tensor& weight, const Tensor& A_acc, const Tensor& Bs_acc, double alpha) {
  const Geometry g = geometry_of(weight);
  const Tensor lines = g.rows ? weight : weight.t();
  const Tensor left = g.rows ? Bs_acc : A_acc.t(), right = g.rows ? A_acc : Bs_acc.t();
  const int64_t band = std::max<int64_t>(1, kBandElements / std::max<int64_t>(g.length, 1));
  const auto sum = [&](int64_t first, int64_t n) {
    return lines.narrow(0, first, n).to(A_acc.scalar_type()) +
           at::mm(left.narrow(0, first, n), right).mul_(alpha);
  };
  Tensor beyond = at::zeros({}, weight.options().dtype(at::kLong));
  for (int64_t first = 0; first < g.count; first += band)
    beyond += sum(first, std::min(band, g.count - first)).abs().le(limit_of(weight.scalar_type()))
                  .logical_not().sum();
  if (const int64_t n = beyond.item<int64_t>(); n > 0)
    return stats_of(0, 0, 0.0, n).to(weight.device());
  for (int64_t first = 0; first < g.count; first += band) {
    const int64_t n = std::min(band, g.count - first);
    lines.narrow(0, first, n).copy_(sum(first, n));
  }
  return weight_stats_aten(weight);
}

bool cpu_loop(const Tensor& weight) { return weight.is_cpu() && !cpu_takes_cuda_fallback(); }

}  // namespace

Tensor weight_stats(const Tensor& weight) {
  check_weight(weight, "soslora::weight_stats");
  if (weight.numel() == 0) return at::zeros({4}, weight.options().dtype(at::kLong));
#ifdef SOSLORA_WITH_CUDA
  if (have_cuda_kernels(weight)) return weight_stats_cuda(weight);
#endif
  if (!cpu_loop(weight)) return weight_stats_aten(weight);
  return weight_stats_cpu(weight);
}

Tensor update_bound(const Tensor& A_acc, const Tensor& Bs_acc, double alpha) {
  if (A_acc.numel() == 0 || Bs_acc.numel() == 0)
    return at::zeros({}, A_acc.options().dtype(at::kDouble));
  const Tensor rows = Bs_acc.to(at::kDouble).square().sum(1).amax();
  const Tensor cols = A_acc.to(at::kDouble).square().sum(0).amax();
  return (rows * cols).sqrt_().mul_(std::abs(alpha));
}

Tensor merge_into_(at::Tensor& weight, const Tensor& A, const Tensor& B, const Tensor& scale,
                   double alpha, std::optional<double> max_abs) {
  check_merge_args(weight, A, B, scale);
  if (weight.numel() == 0) return at::zeros({4}, weight.options().dtype(at::kLong));
  const c10::NoGradGuard no_grad;  // updates a gradient or frozen weight: not differentiable
  const auto acc = at::promote_types(accumulate_dtype(weight.scalar_type()),
                                     at::promote_types(A.scalar_type(), B.scalar_type()));
  const Tensor A_acc = A.to(acc);
  const Tensor Bs_acc = B.to(acc) * scale.to(acc);
  const double limit = limit_of(weight.scalar_type());
  const auto bound_holds = [&](double bound) {
    return (*max_abs + bound) * kBoundSlack < limit;  // false for NaN
  };
  const auto unchecked = [&] { return stats_of(0, 0, 0.0, -1).to(weight.device()); };
#ifdef SOSLORA_WITH_CUDA
  if (have_cuda_kernels(weight)) {
    // The bound's verdict stays on the device: the kernel reads it, the host never waits.
    const Tensor write = max_abs.has_value()
        ? update_bound(A_acc, Bs_acc, alpha).add_(*max_abs).mul_(kBoundSlack).lt(limit)
        : Tensor();
    return merge_into_cuda_(weight, A_acc, Bs_acc, alpha, write);
  }
#endif
  if (!cpu_loop(weight)) {
    if (max_abs.has_value() && !bound_holds(update_bound(A_acc, Bs_acc, alpha).item<double>()))
      return unchecked();
    return merge_aten(weight, A_acc, Bs_acc, alpha);
  }
  if (max_abs.has_value() && !bound_holds(update_bound_cpu(A_acc, Bs_acc, alpha)))
    return unchecked();
  return merge_cpu(weight, A_acc, Bs_acc, alpha);
}

}  // namespace soslora
