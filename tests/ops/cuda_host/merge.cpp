// launch_merge and launch_weight_stats cases: the merged weight against long double, the stats
// (fingerprint sums and max |w|, bit for bit) against a host reference of their definition
// (csrc/soslora.h), a tile whose sum leaves the dtype's range (refused, the rest taken back),
// the guard's bound off (nothing written), and weights with non-finite values.
#include <set>
#include <sstream>

#include "reference.h"

namespace cu = soslora::cuda;

namespace {

// The stats of a weight [rows, cols] at strides (rs, cs), from their definition.
template <class T> std::vector<int64_t> reference_stats(const T* w, int64_t rows, int64_t cols,
                                                        int64_t rs, int64_t cs) {
  uint64_t row_sum = 0, col_sum = 0, count = 0;
  long double max_abs = 0;
  const bool pairs = sizeof(T) == 2 && cols % 2 == 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const T v = w[i * rs + j * cs];
      uint64_t word;
      if constexpr (sizeof(T) == 2) {
        uint16_t b;
        std::memcpy(&b, &v, 2);
        word = pairs ? uint64_t(b) << (16 * (j & 1)) : uint64_t(uint32_t(int32_t(int16_t(b))));
      } else if constexpr (sizeof(T) == 4) {
        uint32_t b;
        std::memcpy(&b, &v, 4);
        word = b;
      } else {
        std::memcpy(&word, &v, 8);
      }
      row_sum += (2 * uint64_t(i) + 1) * word;
      col_sum += (pairs ? 2 * uint64_t(j >> 1) + 1 : 2 * uint64_t(j) + 1) * word;
      const ld a = std::fabs(to_ld(v));
      if (std::isfinite(double(a))) max_abs = std::max(max_abs, a);
      else ++count;
    }
  if (sizeof(T) < 8) row_sum &= 0xFFFFFFFFull, col_sum &= 0xFFFFFFFFull;
  const double m = count ? INFINITY : double(max_abs);
  int64_t m_bits;
  std::memcpy(&m_bits, &m, 8);
  return {int64_t(row_sum), int64_t(col_sum), m_bits, int64_t(count)};
}

void compare_stats(Check& c, const Buffer<int64_t>& got, const std::vector<int64_t>& expected) {
  static const char* fields[] = {"row sum", "column sum", "max |w| bits", "count"};
  for (int f = 0; f < 4 && c.ok; ++f)
    if (got[f] != expected[f])
      c.fail(std::string("stats ") + fields[f] + ": got " + std::to_string(got[f]) +
             ", expected " + std::to_string(expected[f]));
}

struct Shape { int64_t rows, cols, rank; };

// A weight [rows, cols] in one of four layouts: 0 contiguous, 1 transposed, 2 padded rows,
// 3 transposed and padded (padding NaN).
template <class T> struct Weight {
  int64_t rows, cols, rs, cs;
  Buffer<T> w;
  Weight(int64_t r, int64_t c, int layout)
      : rows(r), cols(c),
        rs(layout & 1 ? 1 : c + (layout >= 2 ? 3 + layout : 0)),
        cs(layout & 1 ? r + (layout >= 2 ? 3 + layout : 0) : 1),
        w((r - 1) * rs + (c - 1) * cs + 1) {
    w.fill_nan();
  }
  T& at(int64_t i, int64_t j) { return w[i * rs + j * cs]; }
  std::string describe() const {
    std::ostringstream o;
    o << rows << "x" << cols << " strides=(" << rs << "," << cs << ")";
    return o.str();
  }
};

// ---- merge: weight[o, c] += alpha * sum_j Bs[o, j] A[j, c], one rounding to T ------------------
template <class T, class A> void merge_dtype() {
  const bool acc_double = std::is_same_v<A, double>;
  const char* acc_name = acc_double ? "acc=fp64 " : "acc=fp32 ";
  const Shape shapes[] = {{1, 1, 1},     {1, 70, 3},    {70, 1, 5},  {65, 130, 7}, {64, 64, 32},
                          {100, 37, 33}, {3, 5, 0},     {130, 65, 70}, {17, 200, 16}};
  const double alphas[] = {1.0, -0.5, 2.25, -1.0, 0.3};
  int n = 0;
  for (const Shape& s : shapes)
    for (int layout = 0; layout < 4; ++layout, ++n) {
      const double alpha = alphas[n % 5];
      const ld alpha_acc = ld(A(alpha));
      Weight<T> W(s.rows, s.cols, layout);
      Buffer<A> Bs(s.rows * s.rank), Af(s.rank * s.cols);
      const double scale = 1.0 / std::sqrt(double(std::max<int64_t>(s.rank, 1)));
      for (size_t i = 0; i < Bs.size(); ++i) Bs[i] = A(uniform() * scale);
      for (size_t i = 0; i < Af.size(); ++i) Af[i] = A(uniform());
      for (int64_t o = 0; o < s.rows; ++o)
        for (int64_t c = 0; c < s.cols; ++c) W.at(o, c) = round_to<T>(uniform());
      const auto initial = W.w.contents();
      Buffer<int64_t> stats(4);
      Buffer<unsigned char> refused(cu::merge_tiles(s.rows, s.cols));
      std::ostringstream desc;
      desc << acc_name << W.describe() << " rank=" << s.rank << " alpha=" << alpha;
      const auto check = [&] {
        Check c;
        if (!W.w.guards_intact() || !stats.guards_intact() || !refused.guards_intact())
          c.fail("write outside the buffers");
        std::vector<bool> logical(W.w.size(), false);
        const ld gamma = (s.rank + 4) * unit_roundoff<A>();
        for (int64_t o = 0; o < s.rows && c.ok; ++o)
          for (int64_t cc = 0; cc < s.cols; ++cc) {
            const int64_t off = o * W.rs + cc * W.cs;
            logical[off] = true;
            T w0;
            std::memcpy((void*)&w0, initial.data() + off * sizeof(T), sizeof(T));
            ld sum = 0, abs_sum = 0;
            for (int64_t j = 0; j < s.rank; ++j) {
              const ld term = ld(Bs[o * s.rank + j]) * ld(Af[j * s.cols + cc]);
              sum += term, abs_sum += std::fabs(term);
            }
            const ld ref = to_ld(w0) + alpha_acc * sum;
            const ld e = gamma * (std::fabs(to_ld(w0)) + std::fabs(alpha_acc) * abs_sum);
            c.element(to_ld(W.w[off]), ref, e + ulp<T>(std::fabs(ref) + e) / 2,
                      "(" + std::to_string(o) + "," + std::to_string(cc) + ")");
          }
        for (size_t i = 0; i < W.w.size() && c.ok; ++i)
          if (!logical[i] && !same_bits(&W.w[i], initial.data() + i * sizeof(T), sizeof(T)))
            c.fail("padding element " + std::to_string(i) + " written");
        compare_stats(c, stats, reference_stats(W.w.data(), s.rows, s.cols, W.rs, W.cs));
        return c;
      };
      run_case("launch_merge", Type<T>::name, desc.str(), true,
               [&] { W.w.restore(initial), stats.restore(std::vector<unsigned char>(32, 0)),
                     refused.restore(std::vector<unsigned char>(refused.size(), 0)); },
               [&] { return cu::launch_merge(W.w.data(), Type<T>::dtype, s.rows, s.cols, W.rs,
                                             W.cs, Bs.data(), Af.data(), s.rank, acc_double,
                                             alpha, nullptr, stats.data(), refused.data(),
                                             nullptr); },
               check, [&] { auto out = W.w.contents(), st = stats.contents();
                            out.insert(out.end(), st.begin(), st.end());
                            return out; });
    }
}

// A sum beyond T's range at (o0, c0): its tile is not written, the count is 1, the other tiles
// are written and taken back (within one rounding each way); or, with the guard's bound off
// (write = false), nothing is written and stats[3] = -1.
template <class T, class A> void refusal_dtype() {
  const bool acc_double = std::is_same_v<A, double>;
  const double max = Type<T>::max;  // (CUDA's 16-bit types have no numeric_limits)
  for (int layout = 0; layout < 4; ++layout)
    for (const bool bound_holds : {true, false}) {
      const Shape s{130, 100, 5};
      const int64_t o0 = 70, c0 = 30;
      Weight<T> W(s.rows, s.cols, layout);
      Buffer<A> Bs(s.rows * s.rank), Af(s.rank * s.cols);
      for (size_t i = 0; i < Bs.size(); ++i) Bs[i] = A(uniform() * 0.4);
      for (size_t i = 0; i < Af.size(); ++i) Af[i] = A(uniform());
      for (int64_t o = 0; o < s.rows; ++o) Bs[o * s.rank] = A(o == o0 ? 1.0 : 0.0);
      Af[c0] = A(0.5 * max);  // the update at (o0, c0) alone is of the dtype's range
      for (int64_t o = 0; o < s.rows; ++o)
        for (int64_t c = 0; c < s.cols; ++c) W.at(o, c) = round_to<T>(uniform());
      W.at(o0, c0) = round_to<T>(0.75 * max);
      const auto initial = W.w.contents();
      Buffer<int64_t> stats(4);
      Buffer<unsigned char> refused(cu::merge_tiles(s.rows, s.cols));
      Buffer<bool> write(1);
      write[0] = bound_holds;
      std::ostringstream desc;
      desc << (acc_double ? "acc=fp64 " : "acc=fp32 ") << W.describe()
           << (bound_holds ? " a sum beyond the range" : " the guard's bound off");
      const auto check = [&] {
        Check c;
        if (!W.w.guards_intact() || !stats.guards_intact() || !refused.guards_intact())
          c.fail("write outside the buffers");
        if (stats[0] != 0 || stats[1] != 0 || stats[2] != 0 || stats[3] != (bound_holds ? 1 : -1))
          c.fail("stats " + std::to_string(stats[0]) + " " + std::to_string(stats[1]) + " " +
                 std::to_string(stats[2]) + " " + std::to_string(stats[3]));
        const ld u = unit_roundoff<T>(), gamma = (s.rank + 4) * unit_roundoff<A>();
        for (int64_t o = 0; o < s.rows && c.ok; ++o)
          for (int64_t cc = 0; cc < s.cols; ++cc) {
            const int64_t off = o * W.rs + cc * W.cs;
            const bool same_tile = o / 64 == o0 / 64 && cc / 64 == c0 / 64;
            if (!bound_holds || same_tile) {
              if (!same_bits(&W.w[off], initial.data() + off * sizeof(T), sizeof(T)))
                c.fail("element (" + std::to_string(o) + "," + std::to_string(cc) +
                       ") of an unwritten tile changed");
              continue;
            }
            T w0;
            std::memcpy((void*)&w0, initial.data() + off * sizeof(T), sizeof(T));
            ld abs_sum = 0;
            for (int64_t j = 0; j < s.rank; ++j)
              abs_sum += std::fabs(ld(Bs[o * s.rank + j]) * ld(Af[j * s.cols + cc]));
            const ld size = std::fabs(to_ld(w0)) + 2 * abs_sum;
            c.element(to_ld(W.w[off]), to_ld(w0), 4 * (u + gamma) * size + ulp<T>(0),
                      "(" + std::to_string(o) + "," + std::to_string(cc) + ")");
          }
        if (!std::isfinite(double(to_ld(W.at(o0, c0))))) c.fail("a non-finite value");
        return c;
      };
      run_case("launch_merge", Type<T>::name, desc.str(), true,
               [&] { W.w.restore(initial), stats.restore(std::vector<unsigned char>(32, 0)),
                     refused.restore(std::vector<unsigned char>(refused.size(), 0)); },
               [&] { return cu::launch_merge(W.w.data(), Type<T>::dtype, s.rows, s.cols, W.rs,
                                             W.cs, Bs.data(), Af.data(), s.rank, acc_double,
                                             1.0, write.data(), stats.data(), refused.data(),
                                             nullptr); },
               check, [&] { return W.w.contents(); });
    }
}

// ---- weight_stats: one read ---------------------------------------------------------------------
template <class T> void stats_dtype() {
  const Shape shapes[] = {{1, 1, 0},   {1, 70, 0},   {70, 1, 0},  {65, 130, 0}, {130, 65, 0},
                          {17, 200, 0}, {64, 64, 0}, {3, 5, 0},   {5, 6, 0}};
  int n = 0;
  for (const Shape& s : shapes)
    for (int layout = 0; layout < 4; ++layout, ++n) {
      Weight<T> W(s.rows, s.cols, layout);
      for (int64_t o = 0; o < s.rows; ++o)
        for (int64_t c = 0; c < s.cols; ++c) W.at(o, c) = round_to<T>(uniform(-8, 8));
      if (n % 3 == 2) {  // an infinity and a NaN
        W.at(s.rows - 1, 0) = round_to<T>(INFINITY);
        W.at(0, s.cols - 1) = round_to<T>(NAN);
      }
      Buffer<int64_t> stats(4);
      run_case("launch_weight_stats", Type<T>::name, W.describe(), true,
               [&] { stats.restore(std::vector<unsigned char>(32, 0)); },
               [&] { return cu::launch_weight_stats(W.w.data(), Type<T>::dtype, s.rows, s.cols,
                                                    W.rs, W.cs, stats.data(), nullptr); },
               [&] {
                 Check c;
                 if (!stats.guards_intact()) c.fail("write outside the buffer");
                 compare_stats(c, stats, reference_stats(W.w.data(), s.rows, s.cols, W.rs, W.cs));
                 return c;
               },
               [&] { return stats.contents(); });
    }
}

}  // namespace

void merge_cases(const std::set<std::string>& dtypes) {
  if (dtypes.count("fp32"))
    merge_dtype<float, float>(), merge_dtype<float, double>(), refusal_dtype<float, float>(),
        stats_dtype<float>();
  if (dtypes.count("fp64"))
    merge_dtype<double, double>(), refusal_dtype<double, double>(), stats_dtype<double>();
  if (dtypes.count("fp16"))
    merge_dtype<__half, float>(), merge_dtype<__half, double>(), refusal_dtype<__half, float>(),
        stats_dtype<__half>();
  if (dtypes.count("bf16"))
    merge_dtype<__nv_bfloat16, float>(), merge_dtype<__nv_bfloat16, double>(),
        refusal_dtype<__nv_bfloat16, float>(), stats_dtype<__nv_bfloat16>();
  double w = 0, f = 0;
  int64_t stats[4] = {};
  unsigned char refused = 0;
  expect_error("launch_merge", "fp64 weight with float accumulation", cudaErrorInvalidValue,
               [&] { return cu::launch_merge(&w, DType::kFloat64, 1, 1, 1, 1, &f, &f, 1, false,
                                             1.0, nullptr, stats, &refused, nullptr); });
}
