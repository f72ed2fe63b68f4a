// launch_grad_hidden_and_B cases: grad_h = D(g Bs) and grad_B = (gᵀ h) ∘ S from one pass over
// g, checked element by element against long double, with atomic and deterministic sums of
// grad_B's parts (deterministic: also bitwise equal in a shuffled block and thread order).
#include <algorithm>
#include <set>
#include <sstream>

#include "reference.h"

namespace cu = soslora::cuda;

namespace {

// A [rows, cols] matrix of random values on a buffer whose padding elements are NaN:
// row-major with `pad` unused elements after each row, or column-major (`transposed`).
template <class U> struct Strided {
  int64_t rows, cols, stride0, stride1;
  Buffer<U> data;
  Strided(int64_t r, int64_t c, bool transposed = false, int64_t pad = 0, double scale = 1)
      : rows(r), cols(c) {
    stride0 = transposed ? 1 : cols + pad;
    stride1 = transposed ? rows + pad : 1;
    data = Buffer<U>(rows && cols ? (rows - 1) * stride0 + (cols - 1) * stride1 + 1 : 0);
    data.fill_nan();
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) data[offset(i, j)] = round_to<U>(scale * uniform());
  }
  int64_t offset(int64_t i, int64_t j) const { return i * stride0 + j * stride1; }
  ld at(int64_t i, int64_t j) const { return to_ld(data[offset(i, j)]); }
  cu::Matrix matrix() const { return {data.data(), rows, cols, stride0, stride1}; }
  std::string layout() const {
    if (stride1 != 1) return stride1 == rows ? "T" : "T+pad";
    return stride0 == cols ? "" : "pad";
  }
};

enum class ScaleKind { kNone, kGroups, kChannelsRowMajor, kChannelsTransposed };

struct Case {
  int64_t N, out, r;
  bool deterministic = false;
  double p = 0;                   // grad_h's dropout
  ScaleKind scale = ScaleKind::kNone;
  int64_t groups = 1;             // scale groups (dividing r)
  bool grad_B_acc = false;        // grad_B in the accumulation type
  int64_t min_blocks = 1, max_splits = 0;
  bool want_h = true, want_B = true;
  bool g_t = false, bs_t = false, h_t = false, out_t = false;  // transposed (column-major)
  int64_t g_pad = 0, h_pad = 0, out_pad = 0;
};

std::string describe(const Case& c) {
  std::ostringstream o;
  o << "N=" << c.N << " out=" << c.out << " r=" << c.r
    << (c.deterministic ? " deterministic" : " atomic");
  if (c.p > 0) o << " p=" << c.p;
  const char* scales[] = {"", " scale[G]", " scale[G,out]", " scale[out,G]ᵀ"};
  if (c.scale != ScaleKind::kNone) o << scales[int(c.scale)] << " G=" << c.groups;
  if (c.grad_B_acc) o << " grad_B:acc";
  if (c.min_blocks != 1) o << " min_blocks=" << c.min_blocks;
  if (c.max_splits) o << " max_splits=" << c.max_splits;
  if (!c.want_h) o << " no grad_h";
  if (!c.want_B) o << " no grad_B";
  if (c.g_t || c.g_pad) o << " g[" << (c.g_t ? "T" : "") << (c.g_pad ? "pad" : "") << "]";
  if (c.bs_t) o << " Bs[T]";
  if (c.h_t || c.h_pad) o << " h[" << (c.h_t ? "T" : "") << (c.h_pad ? "pad" : "") << "]";
  if (c.out_t || c.out_pad) o << " outputs[" << (c.out_t ? "T" : "") << (c.out_pad ? "pad" : "")
                              << "]";
  return o.str();
}

// No guard or padding element of an output was written.
template <class U>
bool untouched_outside(const Strided<U>& m, const std::vector<unsigned char>& initial) {
  if (!m.data.guards_intact()) return false;
  std::vector<bool> logical(m.data.size(), false);
  for (int64_t i = 0; i < m.rows; ++i)
    for (int64_t j = 0; j < m.cols; ++j) logical[m.offset(i, j)] = true;
  for (size_t k = 0; k < logical.size(); ++k)
    if (!logical[k] && !same_bits(&m.data[k], initial.data() + k * sizeof(U), sizeof(U)))
      return false;
  return true;
}

template <class T, class O> void fused_case(const Case& c) {
  using A = Acc<T>;
  static int64_t seed_value = 5000;
  // Inputs of the sizes a layer has: Bs and h scaled so that products stay near 1.
  const double rs = 1.0 / std::sqrt(double(std::max<int64_t>(c.r, 1)));
  const Strided<T> g(c.N, c.out, c.g_t, c.g_pad), bs(c.out, c.r, c.bs_t, 0, rs),
      h(c.N, c.r, c.h_t, c.h_pad, rs);
  Strided<T> grad_h(c.N, c.r, c.out_t, c.out_pad);
  Strided<O> grad_B(c.out, c.r, c.out_t, c.out_pad);
  Buffer<int64_t> seed(2);
  seed[0] = seed_value++, seed[1] = 3 * seed_value + 1;
  const Dropout drop{seed[0], seed[1], c.p};
  // The scale, in the accumulation type: [G], [G, out] or a transposed [out, G].
  const int64_t G = c.groups, group = c.r / std::max<int64_t>(G, 1);
  Buffer<A> scale(c.scale == ScaleKind::kNone ? 0 : c.scale == ScaleKind::kGroups ? G : G * c.out);
  for (size_t i = 0; i < scale.size(); ++i) scale[i] = A(uniform(-1.5, 1.5));
  cu::GroupScale S;
  if (c.scale != ScaleKind::kNone) {
    S.data = scale.data(), S.group = group;
    S.row_stride = c.scale == ScaleKind::kGroups ? 0
                   : c.scale == ScaleKind::kChannelsRowMajor ? 1 : G;
    S.group_stride = c.scale == ScaleKind::kChannelsRowMajor ? c.out : 1;
  }
  const auto s_at = [&](int64_t o, int64_t j) -> ld {
    return S.data ? ld(scale[o * S.row_stride + j / S.group * S.group_stride]) : 1;
  };
  const int64_t ws_size = cu::grad_hidden_and_B_workspace(Type<T>::dtype, c.N, c.out, c.r,
                                                          c.min_blocks, c.max_splits,
                                                          c.deterministic);
  Buffer<A> workspace(c.want_B ? ws_size : 0);
  const auto gh0 = grad_h.data.contents();
  const auto gb0 = grad_B.data.contents();

  cu::Matrix gh_m = grad_h.matrix();
  if (c.p > 0) gh_m.dropout_seed = seed.data(), gh_m.dropout_p = c.p;
  if (!c.want_h) gh_m.data = nullptr;
  cu::GradBOutput gb_out;
  gb_out.data = c.want_B ? grad_B.data.data() : nullptr;
  gb_out.stride0 = grad_B.stride0, gb_out.stride1 = grad_B.stride1;
  gb_out.acc_type = c.grad_B_acc;
  gb_out.scale = S;
  const auto launch = [&] {
    return cu::launch_grad_hidden_and_B(Type<T>::dtype, g.matrix(), bs.matrix(), h.matrix(), gh_m,
                                        gb_out, workspace.size() ? workspace.data() : nullptr,
                                        c.min_blocks, c.max_splits, c.deterministic, nullptr);
  };
  const auto reset = [&] {
    grad_h.data.restore(gh0);
    grad_B.data.restore(gb0);
    workspace.fill_nan();  // the launch may assume nothing about it
  };
  const auto outputs = [&] {
    auto bits = grad_h.data.contents();
    const auto b = grad_B.data.contents();
    bits.insert(bits.end(), b.begin(), b.end());
    return bits;
  };

  const auto check = [&] {
    Check k;
    if (!untouched_outside(grad_h, gh0) || !untouched_outside(grad_B, gb0) ||
        !workspace.guards_intact())
      k.fail("write outside an output's elements");
    const ld u = unit_roundoff<A>();
    for (int64_t n = 0; n < c.N && c.want_h; ++n)
      for (int64_t j = 0; j < c.r; ++j) {
        ld v = 0, av = 0;
        for (int64_t o = 0; o < c.out; ++o) {
          const ld term = g.at(n, o) * bs.at(o, j);
          v += term, av += std::fabs(term);
        }
        if (c.p > 0) {
          const ld keep = drop.kept(uint64_t(n * c.r + j)) ? ld(drop.keep<T>()) : 0;
          v *= keep, av *= keep;
        }
        const ld e = (c.out + 4) * u * av;
        k.element(grad_h.at(n, j), v, e + ulp<T>(std::fabs(v) + e) / 2,
                  "grad_h(" + std::to_string(n) + "," + std::to_string(j) + ")");
      }
    // The bands' parts are summed once more: at most N / 32 + 1 of them.
    const ld gamma = (c.N + c.N / 32 + 1 + 4) * u;
    for (int64_t o = 0; o < c.out && c.want_B; ++o)
      for (int64_t j = 0; j < c.r; ++j) {
        ld v = 0, av = 0;
        for (int64_t n = 0; n < c.N; ++n) {
          const ld term = g.at(n, o) * h.at(n, j);
          v += term, av += std::fabs(term);
        }
        const ld s = s_at(o, j);
        v *= s, av *= std::fabs(s);
        const ld e = gamma * av;
        k.element(grad_B.at(o, j), v, e + ulp<O>(std::fabs(v) + e) / 2,
                  "grad_B(" + std::to_string(o) + "," + std::to_string(j) + ")");
      }
    if (!c.want_h && grad_h.data.contents() != gh0) k.fail("grad_h written when not asked for");
    if (!c.want_B && grad_B.data.contents() != gb0) k.fail("grad_B written when not asked for");
    return k;
  };
  const std::string desc = describe(c);
  // The atomic sums add in the order the blocks run: up to two adds onto zero commute exactly.
  const bool reproducible = c.deterministic || c.N <= 64 || !c.want_B;
  run_case("launch_grad_hidden_and_B", Type<T>::name, desc, reproducible, reset, launch, check,
           outputs);
  if (!c.deterministic || !c.want_B) return;
  // Deterministic: the same bits whatever order the blocks and threads run in (run every time,
  // not only with --shuffle).
  reset();
  soslora_emu::set_case("launch_grad_hidden_and_B " + desc + " (in order)");
  const cudaError_t first = launch();
  const auto in_order = outputs();
  run_case("launch_grad_hidden_and_B", Type<T>::name, desc + ", shuffled order", true, reset,
           [&] {
             soslora_emu::set_shuffle_seed(uint64_t(seed_value) * 7919 + 1);
             const cudaError_t err = launch();
             soslora_emu::set_shuffle_seed(0);
             return first != cudaSuccess ? first : err;
           },
           [&] {
             Check k;
             if (outputs() != in_order) k.fail("deterministic sums: other bits in another order");
             return k;
           },
           outputs);
}

template <class T> void fused_dtype() {
  using A = Acc<T>;
  struct Shape { int64_t N, out, r; };
  // N = 1, out below a tile, r = 1, sizes off multiples of 16, 32 and 64, ranks beyond one
  // block's chunk (128 / 64 / 32 by dtype), and empty dimensions.
  const Shape shapes[] = {{1, 1, 1},    {1, 40, 8},    {5, 7, 1},     {70, 33, 16},
                          {64, 64, 64}, {130, 100, 17}, {33, 300, 40}, {200, 45, 130},
                          {257, 70, 24}, {0, 5, 3},     {7, 0, 4},     {9, 12, 0}};
  for (const Shape& s : shapes)
    for (bool det : {false, true}) fused_case<T, T>({s.N, s.out, s.r, det});
  const auto each = [](std::initializer_list<Case> cases) {
    for (Case c : cases) {
      fused_case<T, T>(c);
      c.deterministic = !c.deterministic;
      fused_case<T, T>(c);
    }
  };
  // grad_h's dropout (the hidden's mask, indexed on [N, r]).
  each({{.N = 70, .out = 33, .r = 16, .p = 0.5}, {.N = 130, .out = 100, .r = 17, .p = 0.3},
        {.N = 1, .out = 40, .r = 8, .p = 0.9}, {.N = 200, .out = 45, .r = 130, .p = 0.2}});
  // The scale: per group of ranks, per channel and group (both layouts).
  each({{.N = 70, .out = 33, .r = 16, .scale = ScaleKind::kGroups, .groups = 4},
        {.N = 130, .out = 37, .r = 24, .scale = ScaleKind::kChannelsRowMajor, .groups = 3},
        {.N = 65, .out = 20, .r = 12, .scale = ScaleKind::kChannelsTransposed, .groups = 12},
        {.N = 40, .out = 50, .r = 1, .scale = ScaleKind::kGroups, .groups = 1}});
  // Strided operands and outputs (padded rows defeat the 128-bit loads; transposed ones read
  // element by element).
  each({{.N = 70, .out = 90, .r = 24, .g_pad = 3}, {.N = 70, .out = 90, .r = 24, .g_t = true},
        {.N = 66, .out = 40, .r = 20, .bs_t = true, .h_t = true},
        {.N = 66, .out = 40, .r = 16, .h_pad = 8}, {.N = 66, .out = 40, .r = 19, .h_pad = 5},
        {.N = 100, .out = 35, .r = 20, .out_t = true, .out_pad = 2},
        {.N = 100, .out = 35, .r = 20, .out_pad = 3}});
  // More bands than 64 rows each need (uneven: N split evenly, down to 32 rows a band; as
  // min_blocks asks, the rank chunks counted), and blocks that own several bands.
  each({{.N = 257, .out = 40, .r = 24, .min_blocks = 5},
        {.N = 200, .out = 30, .r = 140, .min_blocks = 9},
        {.N = 130, .out = 40, .r = 24, .min_blocks = 1000},
        {.N = 330, .out = 40, .r = 24, .max_splits = 2},
        {.N = 330, .out = 33, .r = 20, .min_blocks = 1000, .max_splits = 3},
        {.N = 97, .out = 45, .r = 9, .p = 0.5, .max_splits = 1}});
  // One output only.
  each({{.N = 130, .out = 100, .r = 17, .p = 0.3, .want_B = false},
        {.N = 130, .out = 100, .r = 17, .want_h = false},
        {.N = 70, .out = 0, .r = 5, .want_B = false}});
  // grad_B in the accumulation type (the layer's factors in float32 over 16-bit data, or the
  // unscaled sum its channel-scale gradient needs).
  for (bool det : {false, true}) {
    fused_case<T, A>({.N = 130, .out = 100, .r = 17, .deterministic = det, .grad_B_acc = true});
    fused_case<T, A>({.N = 70, .out = 33, .r = 16, .deterministic = det,
                      .scale = ScaleKind::kGroups, .groups = 2, .grad_B_acc = true});
  }

  // Refused: dropout on an input, mismatched shapes, grad_B without workspace, a zero group.
  Buffer<T> x(64), y(64);
  Buffer<A> ws(64);
  Buffer<int64_t> seed(2);
  seed[0] = seed[1] = 1;
  const cu::Matrix g{x.data(), 4, 4, 4, 1}, bs{x.data(), 4, 2, 2, 1}, h{x.data(), 4, 2, 2, 1},
      gh{y.data(), 4, 2, 2, 1};
  cu::GradBOutput gb;
  gb.data = y.data(), gb.stride0 = 2, gb.stride1 = 1;
  const auto refuse = [&](const char* what, cu::Matrix g_, cu::Matrix bs_, cu::Matrix h_,
                          cu::GradBOutput gb_, void* w) {
    expect_error("launch_grad_hidden_and_B", std::string(Type<T>::name) + " " + what,
                 cudaErrorInvalidValue, [&] {
                   return cu::launch_grad_hidden_and_B(Type<T>::dtype, g_, bs_, h_, gh, gb_, w,
                                                       1, 0, false, nullptr);
                 });
  };
  cu::Matrix dropped = g;
  dropped.dropout_seed = seed.data(), dropped.dropout_p = 0.5;
  refuse("dropout on g", dropped, bs, h, gb, ws.data());
  dropped = h;
  dropped.dropout_seed = seed.data(), dropped.dropout_p = 0.5;
  refuse("dropout on h", g, bs, dropped, gb, ws.data());
  refuse("Bs rows != out", g, {x.data(), 3, 2, 2, 1}, h, gb, ws.data());
  refuse("h cols != r", g, bs, {x.data(), 4, 3, 3, 1}, gb, ws.data());
  refuse("grad_B without workspace", g, bs, h, gb, nullptr);
  cu::GradBOutput zero_group = gb;
  zero_group.scale.data = ws.data(), zero_group.scale.group = 0;
  refuse("scale group 0", g, bs, h, zero_group, ws.data());
}

}  // namespace

void fused_cases(const std::set<std::string>& dtypes) {
  if (dtypes.count("fp32")) fused_dtype<float>();
  if (dtypes.count("fp64")) fused_dtype<double>();
  if (dtypes.count("fp16")) fused_dtype<__half>();
  if (dtypes.count("bf16")) fused_dtype<__nv_bfloat16>();
}
