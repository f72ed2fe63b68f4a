// Dropout masks recomputed from a (seed, offset) pair (see philox.h): a CPU loop, the CUDA
// kernels, and ATen integer ops for any other device, all bit-identical.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

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

// v rounded to float toward zero, with the last bit set when inexact ("round to odd"): a second
// rounding to a type at least two bits narrower then equals one correct rounding of v.
float to_float_round_odd(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) == v || !std::isfinite(f)) return f;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) --bits;  // toward zero
  bits |= 1u;
  std::memcpy(&f, &bits, sizeof bits);
  return f;
}

// The kept elements' scale 1/(1-p), rounded once to scalar_t, as the CUDA kernels round it
// (c10::Half and c10::BFloat16 convert from double through float: twice).
template <typename scalar_t> scalar_t keep_scale(double p) {
  const double v = 1.0 / (1.0 - p);
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>)
    return static_cast<scalar_t>(to_float_round_odd(v));
  else
    return static_cast<scalar_t>(v);
}

// Elements per run of Philox words: a stack buffer that stays in L1.
constexpr int64_t kWordsPerRun = 512;

// For every run of consecutive elements of [0, numel), split across threads:
// write(first, count, words) with the words of elements first .. first + count - 1.
template <typename Write>
void for_each_word_run(int64_t numel, uint64_t seed, uint64_t offset, const Write& write) {
  const PhiloxWords words_of = cpu_philox_words();
  at::parallel_for(0, numel, 4 * kWordsPerRun, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[kWordsPerRun];
    for (int64_t first = begin; first < end; first += kWordsPerRun) {
      const int64_t count = std::min(kWordsPerRun, end - first);
      words_of(seed, offset, static_cast<uint64_t>(first), count, words);
      write(first, count, words);
    }
  });
}

// An element's value from its word, as local values in the loops below: with the threshold
// and scale in registers and the pointers restrict-qualified, the compiler turns each loop
// into compares and blends (a branch per element mispredicts on random words).
template <typename scalar_t> struct Select {
  uint32_t threshold;
  scalar_t keep_value;
  scalar_t mask(uint32_t word) const { return word >= threshold ? keep_value : scalar_t(0); }
  scalar_t drop(uint32_t word, scalar_t v) const {
    const scalar_t scaled = static_cast<scalar_t>(v * keep_value);  // always: no branch
    return word >= threshold ? scaled : scalar_t(0);
  }
};

template <typename scalar_t>
void fill_mask_cpu(scalar_t* out, int64_t numel, uint64_t seed, uint64_t offset, double p) {
  const uint32_t threshold = dropout_threshold(p);
  const scalar_t keep_value = keep_scale<scalar_t>(p);
  for_each_word_run(numel, seed, offset, [=](int64_t first, int64_t count, const uint32_t* w) {
    Select<scalar_t> select{threshold, keep_value};
    scalar_t* __restrict o = out + first;
    for (int64_t j = 0; j < count; ++j) o[j] = select.mask(w[j]);
  });
}

// store(out[i], drop(in)[i]) for every element: store writes or accumulates into out[i].
template <typename scalar_t, typename Store>
void drop_into_cpu(scalar_t* out, const scalar_t* in, int64_t numel, uint64_t seed,
                   uint64_t offset, double p, Store store) {
  const uint32_t threshold = dropout_threshold(p);
  const scalar_t keep_value = keep_scale<scalar_t>(p);
  for_each_word_run(numel, seed, offset, [=](int64_t first, int64_t count, const uint32_t* w) {
    Select<scalar_t> select{threshold, keep_value};
    scalar_t* __restrict o = out + first;
    const scalar_t* __restrict i = in + first;
    for (int64_t j = 0; j < count; ++j) store(o[j], select.drop(w[j], i[j]));
  });
}

template <typename scalar_t>
void apply_cpu(scalar_t* out, const scalar_t* in, int64_t numel, uint64_t seed, uint64_t offset,
               double p) {
  drop_into_cpu(out, in, numel, seed, offset, p, [](scalar_t& o, scalar_t dropped) { o = dropped; });
}

// out[i] += drop(in)[i]: the sum rounded as ATen's add_ rounds it (in float for 16-bit types),
// also where the element is dropped (so -0 + 0 gives +0, as there).
template <typename scalar_t>
void add_cpu(scalar_t* out, const scalar_t* in, int64_t numel, uint64_t seed, uint64_t offset,
             double p) {
  drop_into_cpu(out, in, numel, seed, offset, p, [](scalar_t& o, scalar_t dropped) {
    o = static_cast<scalar_t>(o + dropped);
  });
}

// out[i] += drop(t)[i] as add_cpu, then t[i] = drop(x)[i], from one word per element.
template <typename scalar_t>
void add_and_apply_cpu(scalar_t* out, scalar_t* t, const scalar_t* x, int64_t numel,
                       uint64_t seed, uint64_t offset, double p) {
  const uint32_t threshold = dropout_threshold(p);
  const scalar_t keep_value = keep_scale<scalar_t>(p);
  for_each_word_run(numel, seed, offset, [=](int64_t first, int64_t count, const uint32_t* w) {
    Select<scalar_t> select{threshold, keep_value};
    scalar_t* __restrict o = out + first;
    scalar_t* __restrict tt = t + first;
    const scalar_t* __restrict xx = x + first;
    for (int64_t j = 0; j < count; ++j) {
      o[j] = static_cast<scalar_t>(o[j] + select.drop(w[j], tt[j]));
      tt[j] = select.drop(w[j], xx[j]);
    }
  });
}

// ---- the same mask in ATen integer ops (any device, no host sync) --------------------------------

constexpr int64_t kU32 = 0xFFFFFFFF;

// (high, low) 32-bit halves of a * b for a 32-bit constant a and int64 values b < 2^32: split b
// in 16-bit halves so that every product is exact in int64 (as reference.py does).
std::pair<Tensor, Tensor> mulhilo32(int64_t a, const Tensor& b) {
  const Tensor p_hi = b.bitwise_right_shift(16).mul(a), p_lo = b.bitwise_and(0xFFFF).mul(a);
  const Tensor mid = p_hi.bitwise_and(0xFFFF).bitwise_left_shift(16).add(p_lo);
  return {p_hi.bitwise_right_shift(16).add(mid.bitwise_right_shift(32)), mid.bitwise_and(kU32)};
}

// Keep-mask (bool, `numel` elements, on seed's device): dropout_word(seed, offset, i) >=
// threshold, i.e. word i % 4 of the Philox block at counter i / 4.
Tensor keep_mask_aten(const Tensor& seed, int64_t numel, double p) {
  const Tensor s = seed.contiguous();
  const Tensor key = s.select(0, 0), offset = s.select(0, 1);
  const Tensor counter = at::arange((numel + 3) / 4, s.options());
  Tensor c0 = counter.bitwise_and(kU32), c1 = counter.bitwise_right_shift(32);
  Tensor c2 = offset.bitwise_and(kU32).expand_as(c0);
  Tensor c3 = offset.bitwise_right_shift(32).bitwise_and(kU32).expand_as(c0);
  Tensor k0 = key.bitwise_and(kU32), k1 = key.bitwise_right_shift(32).bitwise_and(kU32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 = k0.add(static_cast<int64_t>(kPhiloxW0)).bitwise_and(kU32);
      k1 = k1.add(static_cast<int64_t>(kPhiloxW1)).bitwise_and(kU32);
    }
    auto [hi0, lo0] = mulhilo32(kPhiloxM0, c0);
    auto [hi1, lo1] = mulhilo32(kPhiloxM1, c2);
    c0 = hi1.bitwise_xor(c1).bitwise_xor(k0);
    c1 = lo1;
    c2 = hi0.bitwise_xor(c3).bitwise_xor(k1);
    c3 = lo0;
  }
  // Block b's words w0..w3 decide elements 4b .. 4b + 3.
  const Tensor words = at::stack({c0, c1, c2, c3}, 1).reshape(-1).narrow(0, 0, numel);
  return words.ge(static_cast<int64_t>(dropout_threshold(p)));
}

// keep_scale<T>(p) as a 0-d tensor of dtype on `options`' device.
Tensor keep_scale_tensor(double p, at::ScalarType dtype, const at::TensorOptions& options) {
  Tensor scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "keep_scale", [&] {
    scale = at::scalar_tensor(static_cast<double>(keep_scale<scalar_t>(p)),
                              options.dtype(dtype));
  });
  return scale;
}

// The fallback for CUDA tensors without the kernels, bit-identical to the CPU loop and them.
Tensor dropout_scale_mask_aten(const Tensor& seed, at::IntArrayRef sizes, double p,
                               at::ScalarType dtype) {
  const Tensor keep = keep_mask_aten(seed, c10::multiply_integers(sizes), p).reshape(sizes);
  return keep.to(dtype).mul(keep_scale_tensor(p, dtype, seed.options()));
}

Tensor dropout_apply_aten(const Tensor& t, const Tensor& seed, double p) {
  const Tensor in = t.contiguous();
  const Tensor keep = keep_mask_aten(seed, in.numel(), p).reshape(in.sizes());
  // A product of two elements of t's dtype rounded once, as the CPU loop and the kernels do.
  const Tensor scaled = in.mul(keep_scale_tensor(p, in.scalar_type(), in.options()));
  return at::where(keep, scaled, at::zeros({}, in.options()));
}

}  // namespace

double dropout_keep_value(double p, at::ScalarType dtype) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dropout_keep_value",
                                         [&] { return static_cast<double>(keep_scale<scalar_t>(p)); });
}

// ---- dispatch: the CUDA kernels, the CPU loops, or ATen ------------------------------------------
Tensor dropout_apply(const Tensor& t, const OptTensor& seed, double p) {
  if (p == 0) return t;
#ifdef SOSLORA_WITH_CUDA
  // The mask kernel serves every CudaPath: the ATen form below is a slow fallback, not a choice.
  if (have_cuda_kernels(t)) return dropout_apply_cuda(t, *seed, p);
#endif
  if (!t.is_cpu() || cpu_takes_cuda_fallback()) return dropout_apply_aten(t, *seed, p);
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

bool dropout_cpu_loop(const Tensor& t) {
  return t.is_cpu() && t.is_contiguous() && !cpu_takes_cuda_fallback();
}

void dropout_add_(Tensor& out, const Tensor& t, const OptTensor& seed, double p) {
  const bool cpu_loop = dropout_cpu_loop(out) && t.is_cpu() &&
                        out.scalar_type() == t.scalar_type() && out.sizes() == t.sizes();
  if (p == 0 || !cpu_loop) {
    out.add_(dropout_apply(t, seed, p));
    return;
  }
  // One pass over out, without the dropped [N, in] temporary that add_ would read.
  const Tensor in = t.contiguous();
  const Tensor seed_c = seed->contiguous();
  const auto* s = seed_c.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "dropout_add_", [&] {
    add_cpu<scalar_t>(out.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(), in.numel(),
                      static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1]), p);
  });
}

void dropout_add_and_apply_(Tensor& out, Tensor& t, const Tensor& x, const Tensor& seed,
                            double p) {
  TORCH_CHECK(dropout_cpu_loop(out) && dropout_cpu_loop(t) && x.is_cpu() &&
                  out.sizes() == t.sizes() && t.sizes() == x.sizes() &&
                  out.scalar_type() == t.scalar_type() && t.scalar_type() == x.scalar_type(),
              "dropout_add_and_apply_: expected contiguous CPU tensors of one shape and dtype");
  const Tensor x_c = x.contiguous();
  const Tensor seed_c = seed.contiguous();
  const auto* s = seed_c.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_c.scalar_type(),
                                  "dropout_add_and_apply_", [&] {
    add_and_apply_cpu<scalar_t>(out.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                                x_c.data_ptr<scalar_t>(), x_c.numel(),
                                static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1]), p);
  });
}

Tensor dropout_scale_mask(const Tensor& seed, at::IntArrayRef sizes, double p,
                          at::ScalarType dtype) {
#ifdef SOSLORA_WITH_CUDA
  if (have_cuda_kernels(seed)) return dropout_scale_mask_cuda(seed, sizes, p, dtype);
#endif
  if (!seed.is_cpu() || cpu_takes_cuda_fallback())
    return dropout_scale_mask_aten(seed, sizes, p, dtype);
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
