// The merge and weight_stats on the CPU (merge.cpp has the ops). The update of a band of lines
// is formed by a register-tiled kernel on AVX2 and AVX-512 (at::mm otherwise) and added in
// the same sweep that gathers the stats of the values written; for float32 weights each tile
// is added straight from the registers, so the weight is read and written once, as addmm_
// does, with no [out, in] temporary.
#include "merge_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SOSLORA_X86 1
#endif

namespace soslora {
namespace {

using lines::Geometry;
using lines::Tally;

// ---- the kernels, compiled for three instruction sets --------------------------------------
namespace scalar {
#include "merge_kernels.inc"
}  // namespace scalar

#ifdef SOSLORA_X86
#define SOSLORA_SIMD_REGION 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
template <typename Acc> struct Simd;
template <> struct Simd<float> {
  using Vec = __m256;
  using IVec = __m256i;
  static constexpr int kLanes = 8, kLines = 6;  // 12 accumulators of 16 registers
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec splat(float v) { return _mm256_set1_ps(v); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  // A bit per lane where !(|s| <= limit): beyond the range, or NaN.
  using Mask = unsigned;
  static Mask beyond(Vec s, Vec limit) {
    const Vec a = _mm256_and_ps(s, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, limit, _CMP_NLE_UQ)));
  }
  static IVec zeroi() { return _mm256_setzero_si256(); }
  static IVec bits(Vec v) { return _mm256_castps_si256(v); }
  static IVec magnitude(IVec b) { return _mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF)); }
  static IVec max_u32(IVec a, IVec b) { return _mm256_max_epu32(a, b); }
  static IVec add_u32(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
  static IVec loadi(const uint32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static void storei(uint32_t* p, IVec v) { _mm256_storeu_si256((__m256i*)p, v); }
};
template <> struct Simd<double> {
  using Vec = __m256d;
  static constexpr int kLanes = 4, kLines = 6;
  static Vec zero() { return _mm256_setzero_pd(); }
  static Vec load(const double* p) { return _mm256_loadu_pd(p); }
  static Vec splat(double v) { return _mm256_set1_pd(v); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_pd(a, b, c); }
  static void store(double* p, Vec v) { _mm256_storeu_pd(p, v); }
};
#include "merge_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
template <typename Acc> struct Simd;
template <> struct Simd<float> {
  using Vec = __m512;
  using IVec = __m512i;
  static constexpr int kLanes = 16, kLines = 8;  // 16 accumulators of 32 registers
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec splat(float v) { return _mm512_set1_ps(v); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  using Mask = unsigned;
  static Mask beyond(Vec s, Vec limit) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps(s), limit, _CMP_NLE_UQ);
  }
  static IVec zeroi() { return _mm512_setzero_si512(); }
  static IVec bits(Vec v) { return _mm512_castps_si512(v); }
  static IVec magnitude(IVec b) { return _mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)); }
  static IVec max_u32(IVec a, IVec b) { return _mm512_max_epu32(a, b); }
  static IVec add_u32(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
  static IVec loadi(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static void storei(uint32_t* p, IVec v) { _mm512_storeu_si512(p, v); }
};
template <> struct Simd<double> {
  using Vec = __m512d;
  static constexpr int kLanes = 8, kLines = 8;
  static Vec zero() { return _mm512_setzero_pd(); }
  static Vec load(const double* p) { return _mm512_loadu_pd(p); }
  static Vec splat(double v) { return _mm512_set1_pd(v); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_pd(a, b, c); }
  static void store(double* p, Vec v) { _mm512_storeu_pd(p, v); }
};
#include "merge_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options
#undef SOSLORA_SIMD_REGION
#endif  // SOSLORA_X86

// f(std::integral_constant<Words, ...>) for the way the weight's values enter its words.
template <typename T, class F> decltype(auto) with_words(const Geometry& g, const F& f) {
  using lines::Words;
  if constexpr (sizeof(T) == 2) {
    switch (lines::words_of<T>(g)) {
      case Words::kRowPairs: return f(std::integral_constant<Words, Words::kRowPairs>{});
      case Words::kColumnPairs: return f(std::integral_constant<Words, Words::kColumnPairs>{});
      default: break;
    }
  }
  return f(std::integral_constant<Words, Words::kSingle>{});
}

template <typename T>
void read_lines(CpuIsa isa, const Geometry& g, const T* w, int64_t first, int64_t last,
                Tally<T>& t) {
  with_words<T>(g, [&](auto words) {
    constexpr lines::Words kWords = decltype(words)::value;
#ifdef SOSLORA_X86
    if (isa == CpuIsa::kAvx512) return avx512::read<T, kWords>(g, w, first, last, t);
    if (isa == CpuIsa::kAvx2) return avx2::read<T, kWords>(g, w, first, last, t);
#endif
    scalar::read<T, kWords>(g, w, first, last, t);
  });
}

// Adds d into values [first, first + n) of lines [line0, line0 + count) (see scalar::add).
template <typename T, typename Acc>
int64_t add_lines(CpuIsa isa, const Geometry& g, T* w, int64_t line0, int64_t count,
                  int64_t first, int64_t n, Acc* d, int64_t ld, Acc alpha, Tally<T>& t) {
  return with_words<T>(g, [&](auto words) -> int64_t {
    constexpr lines::Words kWords = decltype(words)::value;
#ifdef SOSLORA_X86
    if (isa == CpuIsa::kAvx512)
      return avx512::add<T, Acc, kWords>(g, w, line0, count, first, n, d, ld, alpha, t);
    if (isa == CpuIsa::kAvx2)
      return avx2::add<T, Acc, kWords>(g, w, line0, count, first, n, d, ld, alpha, t);
#endif
    return scalar::add<T, Acc, kWords>(g, w, line0, count, first, n, d, ld, alpha, t);
  });
}

template <typename T> Tensor weight_stats_typed(const Tensor& weight) {
  const Geometry g = geometry_of(weight);
  const CpuIsa isa = cpu_isa();
  const T* w = weight.const_data_ptr<T>();
  Tally<T> total;
  std::mutex mutex;
  const int64_t grain = std::max<int64_t>(1, kBandElements / std::max<int64_t>(g.length, 1));
  at::parallel_for(0, g.count, grain, [&](int64_t first, int64_t last) {
    Tally<T> t;
    read_lines<T>(isa, g, w, first, last, t);
    const std::lock_guard<std::mutex> lock(mutex);  // wrapping sums and a max: any order
    total.add(t);
  });
  if (total.count > 0) total.max_bits = lines::kInfBits<T>;
  return stats_of(total.row_sum, total.col_sum, lines::widen<double, T>(total.max_bits),
                  total.count);
}

// right [K, length] in panels of `width` columns, [panels][K][width], zero-padded: each tile's
// operand contiguous (rows a weight's length apart would share cache sets).
template <typename Acc> Tensor panels_of(const Tensor& right, int64_t width) {
  const Tensor r = right.stride(1) == 1 ? right : right.contiguous();
  const int64_t K = r.size(0), length = r.size(1), panels = (length + width - 1) / width;
  Tensor out = at::empty({panels, K, width}, r.options());
  const Acc* from = r.const_data_ptr<Acc>();
  Acc* to = out.data_ptr<Acc>();
  const int64_t ld = r.stride(0);
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t n = std::min(width, length - p * width);
    for (int64_t k = 0; k < K; ++k) {
      Acc* o = to + (p * K + k) * width;
      std::copy_n(from + k * ld + p * width, n, o);
      std::fill(o + n, o + width, Acc(0));
    }
  }
  return out;
}

// The updates of a weight's lines, D = left @ right, a band of lines at a time: on AVX2 and
// AVX-512 by the register-tiled kernel (a band is a tile's lines; the weight is prefetched
// while they are computed), otherwise by at::mm in bands of about kBandElements values.
template <typename Acc> struct Updates {
  CpuIsa isa;
  Tensor left, right, last_band, right_panels;
  int64_t count, K, length, band, bands, ld, width;  // width: the kernel's panels (or length)

  Updates(CpuIsa isa_, const Tensor& left_, const Tensor& right_)
      : isa(isa_), left(left_), right(right_), count(left_.size(0)), K(left_.size(1)),
        length(right_.size(1)) {
    band = std::max<int64_t>(1, kBandElements / length);
    ld = width = length;
#ifdef SOSLORA_X86
    if (isa != CpuIsa::kScalar) {
      const bool wide = isa == CpuIsa::kAvx512;
      band = wide ? avx512::Simd<Acc>::kLines : avx2::Simd<Acc>::kLines;
      width = 2 * (wide ? avx512::Simd<Acc>::kLanes : avx2::Simd<Acc>::kLanes);
      ld = (length + width - 1) / width * width;
      right_panels = panels_of<Acc>(right, width);
      // Every tile is whole: the last band's lines in a zero-padded copy.
      if (count % band != 0) {
        const int64_t first = count / band * band;
        last_band = at::constant_pad_nd(left.narrow(0, first, count - first),
                                        {0, 0, 0, band - (count - first)}).contiguous();
      }
    }
#endif
    bands = (count + band - 1) / band;
  }

  Tensor buffer() const { return at::empty({band, ld}, left.options()); }
  int64_t lines_in(int64_t b) const { return std::min(band, count - b * band); }

#ifdef SOSLORA_X86
  template <class Kernel> Kernel tiles(int64_t b, const char* w, int64_t line_bytes,
                                       int64_t value_bytes) const {
    const int64_t n = lines_in(b);
    const Tensor& L = n < band ? last_band : left;
    const Acc* Lp = L.const_data_ptr<Acc>() + (n < band ? 0 : b * band * L.stride(0));
    return Kernel{K, Lp, L.stride(0), L.stride(1), right_panels.const_data_ptr<Acc>(), w, n,
                  line_bytes, width * value_bytes};
  }
#endif

  // Band b's update from column `first` on into `buffer` (line i at i * ld; the kernel's
  // whole panels); `w` (or nullptr): the band's first line in the weight, prefetched
  // (line_stride values apart).
  template <typename T>
  Acc* compute(Tensor& buffer, int64_t b, int64_t first, const T* w, int64_t line_stride) const {
    Acc* D = buffer.data_ptr<Acc>();
#ifdef SOSLORA_X86
    const char* at = reinterpret_cast<const char*>(w);
    const int64_t line_bytes = line_stride * int64_t(sizeof(T)), size = sizeof(T);
    const int64_t panel = first / width, panels = ld / width;
    if (isa == CpuIsa::kAvx512) {
      tiles<avx512::Tiles<Acc>>(b, at, line_bytes, size).store(panel, panels, D, ld);
      return D;
    }
    if (isa == CpuIsa::kAvx2) {
      tiles<avx2::Tiles<Acc>>(b, at, line_bytes, size).store(panel, panels, D, ld);
      return D;
    }
#endif
    Tensor d = buffer.narrow(0, 0, lines_in(b));
    at::mm_out(d, left.narrow(0, b * band, lines_in(b)), right);
    return D;
  }

  // The whole panels of a whole band of float32 lines merged from the registers
  // (Tiles::merge, refused[p] set for each panel p not written); -1 where this instruction set
  // has no such form.
  int64_t merge_from_registers(int64_t b, float* w, int64_t line_stride, float alpha,
                               const Geometry& g, uint32_t* by_position, uint8_t* refused,
                               Tally<float>& t) const {
#ifdef SOSLORA_X86
    if constexpr (std::is_same_v<Acc, float>) {
      const char* at = reinterpret_cast<const char*>(w);
      const int64_t whole = length / width, line_bytes = line_stride * 4;
      if (isa == CpuIsa::kAvx512)
        return tiles<avx512::Tiles<float>>(b, at, line_bytes, 4)
            .merge(whole, w, line_stride, b * band, alpha, g, by_position, refused, t);
      if (isa == CpuIsa::kAvx2)
        return tiles<avx2::Tiles<float>>(b, at, line_bytes, 4)
            .merge(whole, w, line_stride, b * band, alpha, g, by_position, refused, t);
    }
#endif
    return -1;
  }
};

// The merge: band by band, in units (the register form's tiles, else all of a band's lines),
// each unit written whole (its sums within the dtype's range) or not at all (the old values
// its sweep kept in the buffer put back). If any unit was refused, every unit written is taken
// back again (the update subtracted, one more rounding), so the weight is as before, bit for
// bit in the refused units and within one rounding elsewhere, and the count is reported.
template <typename T, typename Acc>
Tensor merge_typed(Tensor& weight, const Tensor& A_acc, const Tensor& Bs_acc, double alpha_) {
  const Geometry g = geometry_of(weight);
  const CpuIsa isa = cpu_isa();
  const Acc alpha = static_cast<Acc>(alpha_);
  // Line l's update is row l of left @ right.
  const Updates<Acc> updates(isa, g.rows ? Bs_acc : A_acc.t(), g.rows ? A_acc : Bs_acc.t());
  T* const w = weight.data_ptr<T>();
  const int64_t bands = updates.bands, band = updates.band, ld = updates.ld;
  // float32 lines of adjacent values take the register form (whole bands of them).
  constexpr bool kFloat = std::is_same_v<T, float> && std::is_same_v<Acc, float>;
  const bool from_registers = kFloat && g.step == 1 && isa != CpuIsa::kScalar;
  const int64_t unit = from_registers ? updates.width : g.length;
  const int64_t units = (g.length + unit - 1) / unit;
  std::vector<uint8_t> refused(bands * units, 0);
  std::vector<int64_t> beyond(bands, 0);
  Tally<T> total;
  std::mutex mutex;
  const int64_t grain = std::max<int64_t>(1, kBandElements / (band * g.length));
  const auto merge_band = [&](Tensor& buffer, int64_t b, uint32_t* by_position, Tally<T>& t) {
    const int64_t n = updates.lines_in(b);
    T* line = w + b * band * g.line_stride;
    uint8_t* refused_b = refused.data() + b * units;
    int64_t done = 0;  // units written from the registers
    if constexpr (kFloat) {
      if (from_registers && n == band) {
        beyond[b] = updates.merge_from_registers(b, line, g.line_stride, alpha, g, by_position,
                                                 refused_b, t);
        done = g.length / unit;
      }
    }
    if (done == units) return;
    Acc* d = updates.compute(buffer, b, done * unit, g.step == 1 ? line : nullptr,
                             g.line_stride);
    for (int64_t u = done; u < units; ++u) {
      const int64_t first = u * unit, size = std::min(unit, g.length - first);
      const int64_t out = add_lines<T, Acc>(isa, g, w, b * band, n, first, size, d + first,
                                            ld, alpha, t);
      if (out == 0) continue;
      beyond[b] += out;
      refused_b[u] = 1;
      for (int64_t i = 0; i < n; ++i)
        lines::restore_segment(g, size, line + i * g.line_stride + first * g.step,
                               d + i * ld + first);
    }
  };
  at::parallel_for(0, bands, grain, [&](int64_t b0, int64_t b1) {
    const c10::NoGradGuard no_grad;  // grad mode is per thread
    Tensor buffer = updates.buffer();
    std::vector<uint32_t> by_position(from_registers ? ld : 0, 0);
    Tally<T> t;
    for (int64_t b = b0; b < b1; ++b) merge_band(buffer, b, by_position.data(), t);
    if constexpr (kFloat) {
      uint32_t weighted = 0;
      for (int64_t j = 0; j < int64_t(by_position.size()); ++j)
        weighted += lines::odd<uint32_t>(j) * by_position[j];
      lines::add_sums<float>(g, 0, weighted, t);
    }
    const std::lock_guard<std::mutex> lock(mutex);  // wrapping sums and a max: any order
    total.add(t);
  });
  int64_t out_of_range = 0;
  for (const int64_t r : beyond) out_of_range += r;
  if (out_of_range == 0)
    return stats_of(total.row_sum, total.col_sum,
                    lines::widen<double, T>(total.max_bits), 0);
  at::parallel_for(0, bands, grain, [&](int64_t b0, int64_t b1) {
    const c10::NoGradGuard no_grad;
    Tensor buffer = updates.buffer();
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* refused_b = refused.data() + b * units;
      if (std::all_of(refused_b, refused_b + units, [](uint8_t r) { return r != 0; })) continue;
      T* line = w + b * band * g.line_stride;
      const Acc* d = updates.compute(buffer, b, 0, static_cast<const T*>(nullptr), 0);
      for (int64_t u = 0; u < units; ++u) {
        if (refused_b[u]) continue;
        const int64_t first = u * unit, size = std::min(unit, g.length - first);
        for (int64_t i = 0; i < updates.lines_in(b); ++i)
          lines::subtract_segment(g, size, line + i * g.line_stride + first * g.step,
                                  d + i * ld + first, -alpha);
      }
    }
  });
  return stats_of(0, 0, 0.0, out_of_range);
}

template <typename Acc>
double update_bound_typed(const Tensor& A_in, const Tensor& Bs_in, double alpha) {
  // max_i sum_k Bs_ik^2 and max_j sum_k A_kj^2 in double (rows of adjacent values: the loops
  // vectorize); NaN if any sum is.
  const Tensor A = A_in.contiguous(), Bs = Bs_in.contiguous();
  const int64_t r = A.size(0), in = A.size(1), out = Bs.size(0);
  const Acc* a = A.const_data_ptr<Acc>();
  const Acc* bs = Bs.const_data_ptr<Acc>();
  bool nan = false;
  double rows = 0, cols = 0;
  for (int64_t i = 0; i < out; ++i) {
    double s = 0;
    for (int64_t k = 0; k < r; ++k) s += double(bs[i * r + k]) * double(bs[i * r + k]);
    nan |= std::isnan(s);
    rows = std::max(rows, s);
  }
  std::vector<double> col(in, 0.0);
  for (int64_t k = 0; k < r; ++k) {
    const Acc* row = a + k * in;
    for (int64_t j = 0; j < in; ++j) col[j] += double(row[j]) * double(row[j]);
  }
  for (const double c : col) {
    nan |= std::isnan(c);
    cols = std::max(cols, c);
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : std::abs(alpha) * std::sqrt(rows * cols);
}

}  // namespace

double update_bound_cpu(const Tensor& A_acc, const Tensor& Bs_acc, double alpha) {
  if (A_acc.numel() == 0 || Bs_acc.numel() == 0) return 0.0;
  return A_acc.scalar_type() == at::kDouble ? update_bound_typed<double>(A_acc, Bs_acc, alpha)
                                            : update_bound_typed<float>(A_acc, Bs_acc, alpha);
}

Tensor weight_stats_cpu(const Tensor& weight) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                         "weight_stats", [&] {
    return weight_stats_typed<scalar_t>(weight);
  });
}

Tensor merge_cpu(Tensor& weight, const Tensor& A_acc, const Tensor& Bs_acc, double alpha) {
  const bool acc_double = A_acc.scalar_type() == at::kDouble;
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                         "merge_into_", [&] {
    if (acc_double) return merge_typed<scalar_t, double>(weight, A_acc, Bs_acc, alpha);
    // A float64 weight always accumulates in float64.
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    return merge_typed<scalar_t, Acc>(weight, A_acc, Bs_acc, alpha);
  });
}

}  // namespace soslora
