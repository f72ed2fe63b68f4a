// launch_product cases: out = D(left @ right) (kStore), out += D(left @ right) (kAdd), out +=
// left @ right split over K (kAtomicAdd), with strided, transposed (swapped strides) and
// dropout operands, checked element by element against long double.
#include <algorithm>
#include <set>
#include <sstream>

#include "reference.h"

namespace cu = soslora::cuda;
using cu::Combine;

namespace {

struct Spec {            // the layout of one test matrix
  bool transposed = false;  // column-major storage: the Matrix has swapped strides
  int64_t pad = 0;       // unused elements after each row (column when transposed)
  double p = 0;          // dropout probability
  int64_t shift = 0;     // unused elements before the first (1: a misaligned start)
  bool align = false;    // pad rows (columns) to a multiple of 16 bytes: 16-byte tile copies
};

std::string describe(const char* name, const Spec& s) {
  std::ostringstream o;
  if (!s.transposed && s.pad == 0 && s.p == 0 && s.shift == 0 && !s.align) return "";
  o << " " << name << "[";
  if (s.transposed) o << "T ";
  if (s.pad) o << "pad" << s.pad << " ";
  if (s.align) o << "aligned ";
  if (s.shift) o << "shift" << s.shift << " ";
  if (s.p > 0) o << "p" << s.p;
  o << "]";
  return o.str();
}

// A [rows, cols] matrix on a buffer whose padding elements are NaN.
template <class U> struct Operand {
  int64_t rows, cols, stride0, stride1;
  Spec spec;
  Buffer<U> data;
  Buffer<int64_t> seed;
  Dropout drop;

  Operand(int64_t r, int64_t c, const Spec& s, int64_t seed_value) : rows(r), cols(c), spec(s) {
    const int64_t inner = s.transposed ? rows : cols, vec = 16 / int64_t(sizeof(U));
    const int64_t pad = s.align ? s.pad + (vec - (inner + s.pad) % vec) % vec : s.pad;
    stride0 = s.transposed ? 1 : cols + pad;
    stride1 = s.transposed ? rows + pad : 1;
    data = Buffer<U>(rows && cols ? s.shift + (rows - 1) * stride0 + (cols - 1) * stride1 + 1
                                  : 0);
    data.fill_nan();
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) data[offset(i, j)] = round_to<U>(uniform());
    if (s.p > 0) {
      seed = Buffer<int64_t>(2);
      seed[0] = seed_value, seed[1] = seed_value * 7 + 1;
      drop = {seed[0], seed[1], s.p};
    }
  }
  int64_t offset(int64_t i, int64_t j) const { return spec.shift + i * stride0 + j * stride1; }
  bool kept(int64_t i, int64_t j) const { return drop.kept(uint64_t(i * cols + j)); }
  cu::Matrix matrix() const {
    cu::Matrix m;
    m.data = data.size() ? data.data() + spec.shift : nullptr;
    m.rows = rows, m.cols = cols, m.stride0 = stride0, m.stride1 = stride1;
    m.dropout_seed = spec.p > 0 ? seed.data() : nullptr;
    m.dropout_p = spec.p;
    return m;
  }
  // The value the kernel reads at (i, j): with dropout, `x * mask` rounded once to U.
  ld load(int64_t i, int64_t j) const {
    const ld x = to_ld(data[offset(i, j)]);
    if (spec.p <= 0) return x;
    return kept(i, j) ? to_ld(round_to<U>(double(x) * drop.keep<U>())) : 0;
  }
};

// The number of K blocks launch_tile_product makes (one: a fixed summation order).
int64_t k_blocks(int64_t K, int64_t splits) {
  int64_t chunk = (K + splits - 1) / splits;
  chunk = std::max<int64_t>((chunk + 31) / 32 * 32, 32);
  return std::max<int64_t>((K + chunk - 1) / chunk, 1);
}

// T: the operands' dtype; O: the output's (T, or the accumulation type for kAtomicAdd).
template <class T, class O>
void product_case(int64_t M, int64_t K, int64_t N, const Spec& ls, const Spec& rs,
                  const Spec& os, Combine combine, int64_t splits = 1) {
  using A = Acc<T>;
  static int64_t seed = 1000;
  const Operand<T> left(M, K, ls, seed++), right(K, N, rs, seed++);
  Operand<O> out(M, N, os, seed++);
  const auto initial = out.data.contents();
  const char* names[] = {"store", "add", "atomic_add"};
  std::ostringstream desc;
  desc << names[int(combine)] << " M=" << M << " K=" << K << " N=" << N;
  if (splits != 1) desc << " splits=" << splits;
  desc << describe("left", ls) << describe("right", rs) << describe("out", os);
  const bool accumulate = combine != Combine::kStore;
  const int64_t kb = combine == Combine::kAtomicAdd ? k_blocks(K, splits) : 1;
  const auto check = [&] {
    Check c;
    if (!out.data.guards_intact()) c.fail("write outside the buffer");
    std::vector<bool> logical(out.data.size(), false);
    const ld gamma = (K + kb + 4) * unit_roundoff<A>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = out.offset(m, n);
        logical[off] = true;
        ld v = 0, av = 0;
        for (int64_t k = 0; k < K; ++k) {
          const ld term = left.load(m, k) * right.load(k, n);
          v += term, av += std::fabs(term);
        }
        if (os.p > 0) {
          const ld keep = out.kept(m, n) ? ld(out.drop.template keep<T>()) : 0;
          v *= keep, av *= keep;
        }
        O o0;
        std::memcpy((void*)&o0, initial.data() + off * sizeof(O), sizeof(O));
        const ld ref = accumulate ? to_ld(o0) + v : v;
        const ld e = gamma * (av + (accumulate ? std::fabs(to_ld(o0)) : 0));
        c.element(to_ld(out.data[off]), ref, e + ulp<O>(std::fabs(ref) + e) / 2,
                  "(" + std::to_string(m) + "," + std::to_string(n) + ")");
      }
    for (size_t i = 0; i < logical.size() && c.ok; ++i)
      if (!logical[i] && !same_bits(&out.data[i], initial.data() + i * sizeof(O), sizeof(O)))
        c.fail("padding element " + std::to_string(i) + " written");
    return c;
  };
  run_case("launch_product", Type<T>::name, desc.str(), kb == 1,
           [&] { out.data.restore(initial); },
           [&] { return cu::launch_product(Type<T>::dtype, left.matrix(), right.matrix(),
                                           out.matrix(), combine, splits, nullptr); },
           check, [&] { return out.data.contents(); });
}

template <class T> void product_dtype() {
  using A = Acc<T>;
  struct Shape { int64_t M, K, N; };
  const Shape shapes[] = {{1, 1, 1},    {1, 40, 8},     {1, 300, 16}, {37, 1, 5},
                          {65, 33, 70}, {64, 64, 64},   {130, 100, 17}, {5, 257, 3},
                          {16, 16, 16}, {70, 0, 9},     {0, 5, 5}};
  const Spec plain, tr{true, 3}, pad{false, 5}, tr0{true, 0};
  const Combine S = Combine::kStore, Add = Combine::kAdd, At = Combine::kAtomicAdd;
  for (const Shape& s : shapes) {
    product_case<T, T>(s.M, s.K, s.N, plain, plain, plain, S);
    product_case<T, T>(s.M, s.K, s.N, plain, plain, plain, Add);
  }
  const auto run = [](std::initializer_list<Shape> list, Spec l, Spec r, Spec o, Combine c) {
    for (const Shape& s : list) product_case<T, T>(s.M, s.K, s.N, l, r, o, c);
  };
  run({{1, 40, 8}, {65, 33, 70}, {130, 100, 17}, {5, 257, 3}}, tr, plain, plain, S);
  run({{1, 300, 16}, {65, 33, 70}, {64, 64, 64}, {130, 100, 17}}, plain, tr, plain, S);
  run({{65, 33, 70}, {130, 100, 17}}, plain, plain, tr, Add);      // transposed output
  run({{65, 33, 70}, {5, 257, 3}}, pad, tr, pad, Add);             // padded everywhere
  run({{1, 40, 8}, {65, 33, 70}, {130, 100, 17}}, {.p = 0.5}, plain, plain, S);   // input dropout
  run({{65, 33, 70}, {5, 257, 3}}, plain, {.p = 0.25}, plain, S);
  run({{65, 33, 70}, {64, 64, 64}}, plain, plain, {.p = 0.5}, S);  // output dropout
  run({{130, 100, 17}, {1, 40, 8}}, plain, plain, {.p = 0.3}, Add);
  run({{65, 33, 70}, {130, 100, 17}}, {false, 0, 0.3}, {true, 0, 0.6}, {false, 0, 0.9}, Add);
  run({{65, 33, 70}}, {.p = 0.9}, tr0, plain, S);
  product_case<T, T>(65, 100, 70, plain, plain, plain, Add, 8);  // splits ignored without atomics
  // Each shared-memory layout (either operand k- or mn-major) with rows padded to 16 bytes, so
  // tiles are copied 16 bytes at a time (partial copies zero-filled at ragged edges), and with
  // a misaligned start, which falls back to element loads.
  for (const bool lt : {false, true})
    for (const bool rt : {false, true}) {
      const Spec l{.transposed = lt, .align = true}, r{.transposed = rt, .align = true};
      run({{72, 40, 136}, {37, 45, 29}, {64, 96, 64}, {1, 33, 9}}, l, r, plain, S);
      run({{72, 40, 136}}, l, r, {.align = true}, Add);
      run({{37, 45, 29}}, {.transposed = lt, .shift = 1, .align = true}, r, plain, S);
      run({{37, 45, 29}}, l, {.transposed = rt, .shift = 1, .align = true}, plain, Add);
      product_case<T, A>(40, 300, 36, l, r, plain, At, 4);
      // Dropout on copied operands: applied to the copies in shared memory.
      run({{72, 40, 136}, {37, 45, 29}}, {.transposed = lt, .p = 0.3, .align = true},
          {.transposed = rt, .p = 0.6, .align = true}, plain, S);
      product_case<T, A>(40, 300, 72, {.transposed = lt, .align = true},
                         {.transposed = rt, .p = 0.5, .align = true}, plain, At, 3);
    }
  // Split K with atomic adds into the accumulation type, as lowrank_grad_A (left = gh.t(),
  // right = x with dropout).
  for (int64_t splits : {1, 2, 3, 7, 64})
    product_case<T, A>(33, 300, 70, tr0, {.p = 0.5}, plain, At, splits);
  product_case<T, A>(2, 2050, 5, plain, plain, plain, At, 64);
  product_case<T, A>(64, 96, 64, plain, tr, plain, At, 3);
  product_case<T, A>(1, 1, 1, plain, plain, plain, At, 64);
  // Refused: an atomic output with dropout, or a non-unit column stride.
  Buffer<A> o(4);
  Buffer<T> x(4);
  Buffer<int64_t> seed(2);
  seed[0] = seed[1] = 1;
  const cu::Matrix in{x.data(), 2, 2, 2, 1};
  const auto refuse = [&](const char* what, cu::Matrix m) {
    expect_error("launch_product", std::string(Type<T>::name) + " atomic add " + what,
                 cudaErrorInvalidValue, [&] {
                   return cu::launch_product(Type<T>::dtype, in, in, m, At, 2, nullptr);
                 });
  };
  refuse("with out dropout", {o.data(), 2, 2, 2, 1, seed.data(), 0.5});
  refuse("with out stride1 != 1", {o.data(), 2, 2, 1, 2});
}

}  // namespace

void product_cases(const std::set<std::string>& dtypes) {
  if (dtypes.count("fp32")) product_dtype<float>();
  if (dtypes.count("fp64")) product_dtype<double>();
  if (dtypes.count("fp16")) product_dtype<__half>();
  if (dtypes.count("bf16")) product_dtype<__nv_bfloat16>();
}
