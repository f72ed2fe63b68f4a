// Dropout masks recomputed from a (seed, offset) pair: see philox.h.
#include <ATen/Parallel.h>

#include "philox.h"
#include "soslora.h"

namespace soslora {

void check_dropout(const OptTensor& dropout_seed, double dropout_p, const Tensor& like,
                   const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK(dropout_seed.has_value(), op, ": dropout_seed is required when dropout_p > 0");
  const Tensor& seed = *dropout_seed;
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.dim() == 1 && seed.size(0) == 2, op,
              ": dropout_seed must be an int64 tensor of shape [2] (seed, offset), got ",
              seed.scalar_type(), " of shape ", seed.sizes());
  TORCH_CHECK(seed.device() == like.device(), op, ": dropout_seed must be on ", like.device(),
              ", got ", seed.device());
}

namespace {

template <typename scalar_t>
void fill_mask_cpu(scalar_t* out, int64_t numel, uint64_t seed, uint64_t offset, double p) {
  const uint32_t threshold = dropout_threshold(p);
  const scalar_t keep_value = static_cast<scalar_t>(1.0 / (1.0 - p));
  at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      out[i] = dropout_keep(seed, offset, static_cast<uint64_t>(i), threshold) ? keep_value
                                                                                 : scalar_t(0);
  });
}

template <typename scalar_t>
void apply_cpu(scalar_t* out, const scalar_t* in, int64_t numel, uint64_t seed, uint64_t offset,
               double p) {
  const uint32_t threshold = dropout_threshold(p);
  const scalar_t keep_value = static_cast<scalar_t>(1.0 / (1.0 - p));
  at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      out[i] = dropout_keep(seed, offset, static_cast<uint64_t>(i), threshold)
                   ? static_cast<scalar_t>(in[i] * keep_value)
                   : scalar_t(0);
  });
}

}  // namespace

Tensor dropout_apply(const Tensor& t, const OptTensor& seed, double p) {
  if (p == 0) return t;
#ifdef SOSLORA_WITH_CUDA
  if (t.is_cuda()) return dropout_apply_cuda(t, *seed, p);
#endif
  TORCH_CHECK(t.is_cpu(), "soslora: dropout on ", t.device(), " is not supported by this build");
  const Tensor in = t.contiguous();
  Tensor out = at::empty_like(in);
  const Tensor seed_c = seed->contiguous();
  const auto* s = seed_c.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "dropout_apply", [&] {
    apply_cpu<scalar_t>(out.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(), in.numel(),
                        static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1]), p);
  });
  return out;
}

Tensor dropout_scale_mask(const Tensor& seed, at::IntArrayRef sizes, double p,
                          at::ScalarType dtype) {
#ifdef SOSLORA_WITH_CUDA
  if (seed.is_cuda()) return dropout_scale_mask_cuda(seed, sizes, p, dtype);
#endif
  TORCH_CHECK(seed.is_cpu(), "soslora: dropout on ", seed.device(),
              " is not supported by this build");
  Tensor mask = at::empty(sizes, seed.options().dtype(dtype));
  const Tensor seed_c = seed.contiguous();
  const auto* s = seed_c.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dropout_scale_mask", [&] {
    fill_mask_cpu<scalar_t>(mask.data_ptr<scalar_t>(), mask.numel(), static_cast<uint64_t>(s[0]),
                            static_cast<uint64_t>(s[1]), p);
  });
  return mask;
}

Tensor dropout_mask(const Tensor& dropout_seed, c10::SymIntArrayRef size, double dropout_p,
                    at::ScalarType dtype) {
  constexpr const char* op = "soslora::dropout_mask";
  TORCH_CHECK(at::isFloatingType(dtype), op, ": dtype must be floating-point, got ", dtype);
  check_dropout(dropout_seed, dropout_p, dropout_seed, op);
  return dropout_scale_mask(dropout_seed, C10_AS_INTARRAYREF_SLOW(size), dropout_p, dtype);
}

}  // namespace soslora
