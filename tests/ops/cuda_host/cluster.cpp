// launch_cluster_forward / launch_cluster_backward cases (CPS-LoRA's cluster form, grouped
// launches through index maps): random permutations, uneven clusters (empty ones, one-row ones,
// rank 0, rank above the block), dropout on the input, with and without the base terms, more
// clusters than one launch holds, each product checked element by element against long double
// from the launch's own inputs (grad_A and grad_x from the grad_hidden the same launch wrote).
#include <algorithm>
#include <numeric>
#include <set>
#include <sstream>

#include "reference.h"

namespace cu = soslora::cuda;

namespace {

struct Spec {
  int64_t n, in, out;
  std::vector<int64_t> rows, cols, ranks;  // per cluster: |R_c|, |C_c|, r_c
  double p = 0;                            // input dropout
  bool with_base = true, with_grad_hidden = false;
  int64_t splits = 1, pad = 0;             // split of the sums over N; row padding of x, grad_out
  bool in_order = false;                   // identity permutations
  int64_t r_max = 0;                       // A's rows (0: the largest rank + 1)
};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> o{0};
  for (int64_t s : sizes) o.push_back(o.back() + s);
  return o;
}

Buffer<int64_t> permutation(int64_t n, bool identity) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  if (!identity) std::shuffle(v.begin(), v.end(), rng());
  Buffer<int64_t> b(n);
  for (int64_t i = 0; i < n; ++i) b[i] = v[i];
  return b;
}

// A [rows, cols] matrix with `pad` unused (NaN) elements after each row.
template <class U> struct Dense {
  int64_t rows = 0, cols = 0, ld = 0;
  Buffer<U> data;
  Dense(int64_t r, int64_t c, int64_t pad = 0, double scale = 1.0)
      : rows(r), cols(c), ld(c + pad), data(r && c ? (r - 1) * (c + pad) + c : 0) {
    data.fill_nan();
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) at(i, j) = round_to<U>(uniform() * scale);
  }
  U& at(int64_t i, int64_t j) { return data[i * ld + j]; }
  long double get(int64_t i, int64_t j) const { return to_ld(data[i * ld + j]); }
  cu::Matrix matrix() const { return {data.data(), rows, cols, ld, 1}; }
};

template <class T> void cluster_case(const Spec& s) {
  using A = Acc<T>;
  const int64_t G = int64_t(s.ranks.size()), n = s.n, in = s.in, out = s.out;
  const auto ro = offsets_of(s.rows), co = offsets_of(s.cols), rk = offsets_of(s.ranks);
  const int64_t R = rk.back();
  const int64_t r_max = s.r_max ? s.r_max : *std::max_element(s.ranks.begin(), s.ranks.end()) + 1;
  Buffer<int64_t> row_index = permutation(out, s.in_order), col_index = permutation(in, s.in_order);
  const double fs = 1.0 / std::sqrt(double(std::max<int64_t>(in / G, 1)));
  Dense<T> x(n, in, s.pad), Af(r_max, in, 0, fs), Bf(out, r_max, 0, 0.5), g(n, out, s.pad);
  Dense<T> base(n, out), gh_in(n, R), gx_base(n, in);
  Buffer<A> scale(G);
  for (int64_t c = 0; c < G; ++c) scale[c] = A(uniform(0.5, 2));
  Buffer<int64_t> seed(2);
  seed[0] = 20240 + n, seed[1] = in * 3 + 1;
  const Dropout drop{seed[0], seed[1], s.p};
  cu::ClusterPartition part{G, row_index.data(), col_index.data(), ro.data(), co.data(), rk.data(),
                            scale.data()};
  cu::Matrix xm = x.matrix();
  if (s.p > 0) xm.dropout_seed = seed.data(), xm.dropout_p = s.p;
  // What the kernels read of x at (t, physical column j): dropped and rounded once to T.
  const auto xd = [&](int64_t t, int64_t j) -> ld {
    const ld v = x.get(t, j);
    if (s.p <= 0) return v;
    return drop.kept(uint64_t(t * in + j)) ? to_ld(round_to<T>(double(v) * drop.keep<T>())) : 0;
  };
  const ld keep = s.p > 0 ? ld(drop.keep<T>()) : 1;

  std::ostringstream desc;
  desc << "N=" << n << " in=" << in << " out=" << out << " G=" << G << " ranks=";
  for (int64_t c = 0; c < G && c < 8; ++c) desc << (c ? "," : "") << s.ranks[c];
  if (G > 8) desc << ",...";
  if (s.p > 0) desc << " p=" << s.p;
  if (!s.with_base) desc << " no-base";
  if (s.with_grad_hidden) desc << " +grad_hidden";
  if (s.splits != 1) desc << " splits=" << s.splits;
  if (s.pad) desc << " pad" << s.pad;
  if (s.in_order) desc << " in-order";
  // One element: |got - ref| <= (K + 4) u_acc (sum|terms| + |addend|) + half an ulp of U.
  const auto element = [](Check& c, ld got, ld ref, ld abs_terms, int64_t K, auto ulp_of,
                          const std::string& where) {
    const ld e = (K + 4) * unit_roundoff<A>() * abs_terms;
    c.element(got, ref, e + ulp_of(std::fabs(ref) + e) / 2, where);
  };
  const auto ulp_T = [](ld v) { return ulp<T>(v); };
  const auto ulp_A = [](ld v) { return ulp<A>(v); };

  // ---- forward ----
  Dense<T> hidden(n, R), o(n, out);
  const cu::Matrix base_m = base.matrix();
  run_case("launch_cluster_forward", Type<T>::name, desc.str(), true,
           [&] { hidden.data.fill_nan(), o.data.fill_nan(); },
           [&] { return cu::launch_cluster_forward(Type<T>::dtype, part, xm, Af.matrix(),
                                                   Bf.matrix(), hidden.matrix(), o.matrix(),
                                                   s.with_base ? &base_m : nullptr, nullptr); },
           [&] {
             Check c;
             if (!hidden.data.guards_intact() || !o.data.guards_intact())
               c.fail("write outside the buffer");
             for (int64_t k = 0; k < G; ++k)
               for (int64_t t = 0; t < n; ++t) {
                 for (int64_t j = 0; j < s.ranks[k] && c.ok; ++j) {  // hidden_c
                   ld v = 0, av = 0;
                   for (int64_t q = 0; q < s.cols[k]; ++q) {
                     const ld term = xd(t, col_index[co[k] + q]) * Af.get(j, co[k] + q);
                     v += term, av += std::fabs(term);
                   }
                   element(c, hidden.get(t, rk[k] + j), v, av, s.cols[k], ulp_T,
                           "hidden(" + std::to_string(t) + "," + std::to_string(rk[k] + j) + ")");
                 }
                 for (int64_t j = 0; j < s.rows[k] && c.ok; ++j) {  // out[:, R_c]
                   const int64_t col = row_index[ro[k] + j];
                   ld v = 0, av = 0;
                   for (int64_t q = 0; q < s.ranks[k]; ++q) {
                     const ld term = hidden.get(t, rk[k] + q) * Bf.get(ro[k] + j, q);
                     v += term, av += std::fabs(term);
                   }
                   const ld b = s.with_base ? base.get(t, col) : 0, sc = ld(scale[k]);
                   element(c, o.get(t, col), b + sc * v, std::fabs(b) + sc * av, s.ranks[k] + 1,
                           ulp_T, "out(" + std::to_string(t) + "," + std::to_string(col) + ")");
                 }
               }
             return c;
           },
           [&] {
             auto v = hidden.data.contents(), w = o.data.contents();
             v.insert(v.end(), w.begin(), w.end());
             return v;
           });

  // ---- backward (from the forward's hidden) ----
  Dense<T> grad_hidden(n, R), grad_x(n, in);
  Buffer<A> gA(r_max * in), gB(out * r_max);
  cu::Matrix gxm = grad_x.matrix();
  if (s.p > 0) gxm.dropout_seed = seed.data(), gxm.dropout_p = s.p;
  const cu::Matrix gh_in_m = gh_in.matrix(), gx_base_m = gx_base.matrix();
  const bool reproducible = s.splits == 1;
  run_case("launch_cluster_backward", Type<T>::name, desc.str(), reproducible,
           [&] {
             grad_hidden.data.fill_nan(), grad_x.data.fill_nan();
             for (size_t i = 0; i < gA.size(); ++i) gA[i] = 0;
             for (size_t i = 0; i < gB.size(); ++i) gB[i] = 0;
           },
           [&] {
             return cu::launch_cluster_backward(
                 Type<T>::dtype, part, g.matrix(), xm, Af.matrix(), Bf.matrix(), hidden.matrix(),
                 grad_hidden.matrix(), s.with_grad_hidden ? &gh_in_m : nullptr, gA.data(),
                 gB.data(), gxm, s.with_base ? &gx_base_m : nullptr, s.splits, nullptr);
           },
           [&] {
             Check c;
             if (!grad_hidden.data.guards_intact() || !grad_x.data.guards_intact() ||
                 !gA.guards_intact() || !gB.guards_intact())
               c.fail("write outside the buffer");
             int64_t chunk = (n + s.splits - 1) / s.splits;  // as launch_tile_products splits
             chunk = std::max<int64_t>((chunk + 31) / 32 * 32, 32);
             const int64_t kb = (n + chunk - 1) / chunk;
             for (int64_t k = 0; k < G && c.ok; ++k) {
               const ld sc = ld(scale[k]);
               for (int64_t t = 0; t < n; ++t)
                 for (int64_t j = 0; j < s.ranks[k]; ++j) {  // grad_hidden_c
                   ld v = 0, av = 0;
                   for (int64_t q = 0; q < s.rows[k]; ++q) {
                     const ld term = g.get(t, row_index[ro[k] + q]) * Bf.get(ro[k] + q, j);
                     v += term, av += std::fabs(term);
                   }
                   const ld b = s.with_grad_hidden ? gh_in.get(t, rk[k] + j) : 0;
                   element(c, grad_hidden.get(t, rk[k] + j), b + sc * v, std::fabs(b) + sc * av,
                           s.rows[k] + 1, ulp_T, "grad_hidden(" + std::to_string(t) + "," +
                                                     std::to_string(rk[k] + j) + ")");
                 }
               for (int64_t i = 0; i < s.rows[k]; ++i)  // grad_B[R_c block, :]
                 for (int64_t j = 0; j < r_max; ++j) {
                   ld v = 0, av = 0;
                   for (int64_t t = 0; t < n && j < s.ranks[k]; ++t) {
                     const ld term = g.get(t, row_index[ro[k] + i]) * hidden.get(t, rk[k] + j);
                     v += term, av += std::fabs(term);
                   }
                   element(c, ld(gB[(ro[k] + i) * r_max + j]), sc * v, sc * av, n + kb + 1,
                           ulp_A, "grad_B(" + std::to_string(ro[k] + i) + "," +
                                      std::to_string(j) + ")");
                 }
               for (int64_t i = 0; i < r_max; ++i)  // grad_A[:, C_c block]
                 for (int64_t j = 0; j < s.cols[k]; ++j) {
                   ld v = 0, av = 0;
                   for (int64_t t = 0; t < n && i < s.ranks[k]; ++t) {
                     const ld term = grad_hidden.get(t, rk[k] + i) * xd(t, col_index[co[k] + j]);
                     v += term, av += std::fabs(term);
                   }
                   element(c, ld(gA[i * in + co[k] + j]), v, av, n + kb, ulp_A,
                           "grad_A(" + std::to_string(i) + "," + std::to_string(co[k] + j) + ")");
                 }
               for (int64_t t = 0; t < n; ++t)  // grad_x[:, C_c]
                 for (int64_t j = 0; j < s.cols[k]; ++j) {
                   const int64_t col = col_index[co[k] + j];
                   ld v = 0, av = 0;
                   for (int64_t q = 0; q < s.ranks[k]; ++q) {
                     const ld term = grad_hidden.get(t, rk[k] + q) * Af.get(q, co[k] + j);
                     v += term, av += std::fabs(term);
                   }
                   const ld d = drop.kept(uint64_t(t * in + col)) ? keep : 0;
                   const ld b = s.with_base ? gx_base.get(t, col) : 0;
                   element(c, grad_x.get(t, col), b + d * v, std::fabs(b) + d * av,
                           s.ranks[k] + 1, ulp_T,
                           "grad_x(" + std::to_string(t) + "," + std::to_string(col) + ")");
                 }
             }
             return c;
           },
           [&] {
             std::vector<unsigned char> v;
             for (const auto& b : {grad_hidden.data.contents(), grad_x.data.contents(),
                                   gA.contents(), gB.contents()})
               v.insert(v.end(), b.begin(), b.end());
             return v;
           });
}

// Sizes that sum to `total` over `parts` clusters, uneven, with the listed clusters empty.
std::vector<int64_t> uneven(int64_t total, int64_t parts, std::set<int64_t> empty = {},
                            int64_t one = -1) {
  std::vector<int64_t> s(parts, 0);
  int64_t left = total;
  if (one >= 0 && left > 0) s[one] = 1, --left;
  std::vector<int64_t> live;
  for (int64_t c = 0; c < parts; ++c)
    if (!empty.count(c) && c != one) live.push_back(c);
  for (int64_t i = 0; i < left; ++i)  // skewed: early live clusters get more
    ++s[live[std::min<int64_t>(int64_t(live.size()) - 1,
                               int64_t(std::floor(std::pow(uniform(0, 1), 1.7) * live.size())))]];
  return s;
}

template <class T> void cluster_dtype() {
  // G = 4: cluster 2 empty (no rows, no columns), cluster 3 one output row, ranks with a 0.
  for (const int64_t n : {1, 37, 130}) {
    Spec s{n, 45, 53, uneven(53, 4, {2}, 3), uneven(45, 4, {2}), {3, 0, 2, 5}};
    cluster_case<T>(s);
    s.p = 0.3, s.splits = 3;
    cluster_case<T>(s);
    s.with_base = false, s.with_grad_hidden = true, s.pad = 3;
    cluster_case<T>(s);
  }
  // Clusters with rows but no columns and the reverse; a rank above its block; in index order.
  cluster_case<T>({70, 20, 90, {40, 0, 50}, {0, 12, 8}, {2, 4, 16}, 0.5, true, true, 7});
  cluster_case<T>({33, 64, 64, uneven(64, 2), uneven(64, 2), {16, 16}, 0.0, true, false, 1, 0,
                   true});
  // One cluster (plain LoRA through the maps), aligned sizes: the byte-copy paths.
  cluster_case<T>({96, 64, 72, {72}, {64}, {16}, 0.0, true, true, 2, 0, false, 16});
  // More clusters than one launch's parameters hold: several launches per product.
  std::vector<int64_t> ranks(40);
  for (int64_t c = 0; c < 40; ++c) ranks[c] = c % 5;
  cluster_case<T>({17, 100, 120, uneven(120, 40, {5}), uneven(100, 40, {9}), ranks, 0.2, true,
                   false, 2});
}

}  // namespace

void cluster_cases(const std::set<std::string>& dtypes) {
  if (dtypes.count("fp32")) cluster_dtype<float>();
  if (dtypes.count("fp64")) cluster_dtype<double>();
  if (dtypes.count("fp16")) cluster_dtype<__half>();
  if (dtypes.count("bf16")) cluster_dtype<__nv_bfloat16>();
}

// A column index outside [0, in): the kernel must stop (a trap), not read outside x.
void cluster_bad_index() {
  Buffer<int64_t> rows = permutation(3, true), cols = permutation(4, true);
  cols[2] = 4;
  const std::vector<int64_t> ro{0, 3}, co{0, 4}, rk{0, 2};
  Buffer<float> scale(1), x(2 * 4), A(2 * 4), B(3 * 2), hidden(2 * 2), out(2 * 3);
  scale[0] = 1;
  for (auto* b : {&x, &A, &B}) for (size_t i = 0; i < b->size(); ++i) (*b)[i] = 1;
  cu::ClusterPartition part{1, rows.data(), cols.data(), ro.data(), co.data(), rk.data(),
                            scale.data()};
  soslora_emu::set_case("launch_cluster_forward with col_index[2] = 4 (in = 4)");
  cu::launch_cluster_forward(DType::kFloat32, part, {x.data(), 2, 4, 4, 1}, {A.data(), 2, 4, 4, 1},
                             {B.data(), 3, 2, 2, 1}, {hidden.data(), 2, 2, 2, 1},
                             {out.data(), 2, 3, 3, 1}, nullptr, nullptr);
  std::printf("no trap: the bad index was not caught\n");
}
