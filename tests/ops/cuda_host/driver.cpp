// Calls every launcher of csrc/cuda/kernels.h on the host emulator and compares with a long
// double reference written from the formulas in kernels.h (see README.md for the bounds).
//   driver [--shuffle SEED] [--only dropout,merge,product,penalty,fused,cluster,status]
//          [--dtypes fp32,...] [--big] [--trap]   (--trap: a bad index map must stop the kernel)
#include <cstdlib>
#include <set>
#include <sstream>

#include "reference.h"

namespace cu = soslora::cuda;

void merge_cases(const std::set<std::string>& dtypes);
void product_cases(const std::set<std::string>& dtypes);
void penalty_cases(const std::set<std::string>& dtypes);
void fused_cases(const std::set<std::string>& dtypes);
void cluster_cases(const std::set<std::string>& dtypes);
void cluster_bad_index();

Results& results() {
  static Results r;
  return r;
}

void run_case(const std::string& launcher, const char* dtype, const std::string& description,
              bool reproducible, const std::function<void()>& reset,
              const std::function<cudaError_t()>& launch, const std::function<Check()>& check,
              const std::function<std::vector<unsigned char>()>& outputs) {
  Results& r = results();
  Tally& t = r.table[{launcher, dtype}];
  const std::string name = launcher + " " + dtype + " " + description;
  soslora_emu::set_case(name);
  reset();
  cudaError_t err = launch();
  Check c = err == cudaSuccess ? check() : Check{};
  if (err != cudaSuccess) c.fail(std::string("returned ") + cudaGetErrorName(err));
  if (c.ok && r.shuffle != 0) {
    const auto first = outputs();
    soslora_emu::set_shuffle_seed(r.shuffle + uint64_t(r.total));
    soslora_emu::set_case(name + " (shuffled)");
    reset();
    err = launch();
    soslora_emu::set_shuffle_seed(0);
    if (err != cudaSuccess) c.fail(std::string("shuffled: returned ") + cudaGetErrorName(err));
    else if (reproducible && outputs() != first) c.fail("shuffled run: other bits than in order");
    else if (!reproducible) c = check();
  }
  ++r.total;
  ++t.cases;
  t.worst = std::max(t.worst, c.worst);
  if (c.ref_sq > 0) t.frobenius = std::max(t.frobenius, double(std::sqrt(c.err_sq / c.ref_sq)));
  if (!c.ok) {
    ++t.failed;
    r.failures.push_back(name + ": " + c.detail);
    std::printf("FAIL %s: %s\n", name.c_str(), c.detail.c_str());
  }
}

// A case whose launcher must refuse the arguments with `expected`.
void expect_error(const std::string& launcher, const std::string& description,
                  cudaError_t expected, const std::function<cudaError_t()>& launch) {
  Results& r = results();
  Tally& t = r.table[{launcher, "-"}];
  soslora_emu::set_case(launcher + " refuses " + description);
  const cudaError_t got = launch();
  ++r.total;
  ++t.cases;
  if (got == expected) return;
  ++t.failed;
  r.failures.push_back(launcher + " " + description + ": returned " + cudaGetErrorName(got) +
                       ", expected " + cudaGetErrorName(expected));
  std::printf("FAIL %s\n", r.failures.back().c_str());
}

// ---- dropout: bitwise equal to the mask / the product `in * mask` in T -----------------------------
template <class T> Check bits_equal(const Buffer<T>& got, const std::vector<T>& expected) {
  Check c;
  if (!got.guards_intact()) c.fail("write outside the buffer");
  for (size_t i = 0; i < expected.size() && c.ok; ++i)
    if (!same_bits(&got[i], &expected[i], sizeof(T)))
      c.element(to_ld(got[i]), to_ld(expected[i]), 0, "element " + std::to_string(i));
  return c;
}

template <class T> void dropout_cases(bool big) {
  struct Spec { int64_t numel; double p; int64_t seed, offset; };
  std::vector<Spec> specs = {{0, 0.5, 1, 0},          {1, 0.5, 7, 3},
                             {255, 0.1, 42, 0},       {256, 0.5, -5, int64_t(1) << 33},
                             {257, 0.9, 1234567890123, 77}, {1000, 0.0, 3, 9},
                             {70001, 0.3, 99, 12345}};
  // More than 65536 blocks of 256 threads: the grid-stride loops wrap.
  if (big) specs.push_back({65536LL * 256 + 1001, 0.5, 5, 6});
  for (const Spec& s : specs) {
    const Dropout d{s.seed, s.offset, s.p};
    Buffer<int64_t> seed(2);
    seed[0] = s.seed, seed[1] = s.offset;
    const T keep = round_to<T>(1.0 / (1.0 - s.p)), zero = round_to<T>(0.0);
    std::vector<T> mask(s.numel), applied(s.numel), input(s.numel);
    for (int64_t i = 0; i < s.numel; ++i) {
      input[i] = round_to<T>(uniform(-4, 4));
      const bool kept = d.kept(uint64_t(i));
      mask[i] = kept ? keep : zero;
      applied[i] = kept ? round_to<T>(double(to_ld(input[i])) * double(to_ld(keep))) : zero;
    }
    std::ostringstream desc;
    desc << "numel=" << s.numel << " p=" << s.p;
    Buffer<T> out(s.numel), in(s.numel);
    const auto snapshot = [&] { return out.contents(); };
    run_case("launch_dropout_mask", Type<T>::name, desc.str(), true, [&] { out.fill_nan(); },
             [&] { return cu::launch_dropout_mask(out.data(), Type<T>::dtype, s.numel,
                                                  seed.data(), s.p, nullptr); },
             [&] { return bits_equal(out, mask); }, snapshot);
    const auto set_input = [&](Buffer<T>& b) {
      if (s.numel) std::memcpy((void*)b.data(), input.data(), s.numel * sizeof(T));
    };
    run_case("launch_dropout_apply", Type<T>::name, desc.str(), true,
             [&] { out.fill_nan(), set_input(in); },
             [&] { return cu::launch_dropout_apply(out.data(), in.data(), Type<T>::dtype,
                                                   s.numel, seed.data(), s.p, nullptr); },
             [&] { return bits_equal(out, applied); }, snapshot);
    run_case("launch_dropout_apply", Type<T>::name, desc.str() + " in place", true,
             [&] { set_input(out); },
             [&] { return cu::launch_dropout_apply(out.data(), out.data(), Type<T>::dtype,
                                                   s.numel, seed.data(), s.p, nullptr); },
             [&] { return bits_equal(out, applied); }, snapshot);
  }
}

int main(int argc, char** argv) {
  std::set<std::string> only, dtypes = {"fp32", "fp64", "fp16", "bf16"};
  bool big = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto list = [&] {
      std::set<std::string> s;
      std::stringstream ss(i + 1 < argc ? argv[++i] : "");
      for (std::string x; std::getline(ss, x, ',');) s.insert(x);
      return s;
    };
    if (a == "--shuffle" && i + 1 < argc) results().shuffle = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--only") only = list();
    else if (a == "--dtypes") dtypes = list();
    else if (a == "--big") big = true;
    else if (a == "--trap") return cluster_bad_index(), 1;
    else { std::fprintf(stderr, "usage: %s [--shuffle SEED] [--only LIST] [--dtypes LIST] [--big] [--trap]\n", argv[0]); return 64; }
  }
  const auto want = [&](const char* what) { return only.empty() || only.count(what); };
  if (want("status"))
    run_case("kernel_image_status", "-", "", true, [] {}, [] { return cu::kernel_image_status(); },
             [] { return Check{}; }, [] { return std::vector<unsigned char>{}; });
  if (want("dropout")) {
    if (dtypes.count("fp32")) dropout_cases<float>(big);
    if (dtypes.count("fp64")) dropout_cases<double>(false);
    if (dtypes.count("fp16")) dropout_cases<__half>(false);
    if (dtypes.count("bf16")) dropout_cases<__nv_bfloat16>(false);
  }
  if (want("merge")) merge_cases(dtypes);
  if (want("product")) product_cases(dtypes);
  if (want("penalty")) penalty_cases(dtypes);
  if (want("fused")) fused_cases(dtypes);
  if (want("cluster")) cluster_cases(dtypes);

  const Results& r = results();
  for (const auto& [key, t] : r.table)
    std::printf("%-26s %-4s %4d cases  max err/bound %-6.3g max rel. Frobenius err %-8.2g %s\n",
                key.first.c_str(), key.second.c_str(), t.cases, t.worst, t.frobenius,
                t.failed ? "FAILED" : "ok");
  const auto s = soslora_emu::stats();
  std::printf("emulated %llu launches, %llu blocks, %llu threads, %llu barriers, %llu warp-level "
              "wmma operations, %llu cp.async copies; %llu launches checked for races between "
              "blocks (%llu too large)%s\n", (unsigned long long)s.launches,
              (unsigned long long)s.blocks, (unsigned long long)s.threads,
              (unsigned long long)s.barriers, (unsigned long long)s.wmma_ops,
              (unsigned long long)s.async_copies, (unsigned long long)s.race_checked,
              (unsigned long long)s.race_skipped, r.shuffle ? " (every case also shuffled)" : "");
  if (r.failures.empty()) {
    std::printf("%d cases, all passed\n", r.total);
    return 0;
  }
  std::printf("%d cases, %zu FAILED:\n", r.total, r.failures.size());
  for (const auto& f : r.failures) std::printf("  %s\n", f.c_str());
  return 1;
}
