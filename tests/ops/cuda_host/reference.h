// The driver's tools: element types, guarded buffers, error bounds and the results table.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "cuda/kernels.h"
#include "cuda_emu.h"
#include "philox.h"

using soslora::cuda::DType;
using ld = long double;

// ---- element types ------------------------------------------------------------------------------
template <class T> struct Type;
template <> struct Type<float> {
  static constexpr DType dtype = DType::kFloat32;
  static constexpr const char* name = "fp32";
  static constexpr int digits = 24, emin = -126;
  static constexpr double max = 3.4028234663852886e38;
};
template <> struct Type<double> {
  static constexpr DType dtype = DType::kFloat64;
  static constexpr const char* name = "fp64";
  static constexpr int digits = 53, emin = -1022;
  static constexpr double max = 1.7976931348623157e308;
};
template <> struct Type<__half> {
  static constexpr DType dtype = DType::kFloat16;
  static constexpr const char* name = "fp16";
  static constexpr int digits = 11, emin = -14;
  static constexpr double max = 65504.0;
};
template <> struct Type<__nv_bfloat16> {
  static constexpr DType dtype = DType::kBFloat16;
  static constexpr const char* name = "bf16";
  static constexpr int digits = 8, emin = -126;
  static constexpr double max = 3.3895313892515355e38;
};

template <class T> using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T> ld to_ld(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return v;
}
// Round to nearest even (a double argument is rounded once).
template <class T> T round_to(double v) {
  if constexpr (std::is_same_v<T, __half>) return __double2half(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __double2bfloat16(v);
  else return static_cast<T>(v);
}
// Unit in the last place of |x| in T (subnormals included); unit roundoff u = ulp(1) / 2.
template <class T> ld ulp(ld x) {
  const int e = x == 0 ? Type<T>::emin : std::max(std::ilogb(std::fabs(double(x))), Type<T>::emin);
  return std::ldexp(1.0L, e - Type<T>::digits + 1);
}
template <class T> constexpr ld unit_roundoff() { return std::ldexp(1.0L, -Type<T>::digits); }

// The dropout decision and scale exactly as kernels.h specifies them (philox.h on the host).
struct Dropout {
  int64_t seed = 0, offset = 0;
  double p = 0;
  bool kept(uint64_t index) const {
    return p <= 0 || soslora::dropout_keep(uint64_t(seed), uint64_t(offset), index,
                                           soslora::dropout_threshold(p));
  }
  template <class T> double keep() const { return double(to_ld(round_to<T>(1.0 / (1.0 - p)))); }
};

// ---- buffers --------------------------------------------------------------------------------------
// Device memory stand-in. The plain build surrounds it with 0xFF guard bytes that must survive
// every launch (out-of-bounds writes) and that turn out-of-bounds reads into NaN; under ASan
// the allocation is exact, so ASan reports either.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kGuardBytes = 0;
#else
constexpr size_t kGuardBytes = 256;
#endif

template <class T> class Buffer {
 public:
  explicit Buffer(size_t n = 0) : n_(n), bytes_(n * sizeof(T) + 2 * kGuardBytes) {
    if (!bytes_.empty()) std::memset(bytes_.data(), 0xFF, bytes_.size());
    if (n_) soslora_emu::device_memory(data(), n_ * sizeof(T), true);
  }
  // Registered with the emulator by address (races.cpp): moved, never copied.
  Buffer(Buffer&& o) noexcept : n_(o.n_), bytes_(std::move(o.bytes_)) { o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      n_ = o.n_, bytes_ = std::move(o.bytes_);
      o.n_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }
  T* data() { return n_ ? reinterpret_cast<T*>(bytes_.data() + kGuardBytes) : nullptr; }
  const T* data() const { return const_cast<Buffer*>(this)->data(); }
  size_t size() const { return n_; }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }
  void fill_nan() {
    if (n_) std::memset(static_cast<void*>(data()), 0xFF, n_ * sizeof(T));
  }
  bool guards_intact() const {
    for (size_t i = 0; i < kGuardBytes; ++i)
      if (bytes_[i] != 0xFF || bytes_[bytes_.size() - 1 - i] != 0xFF) return false;
    return true;
  }
  std::vector<unsigned char> contents() const {
    const auto* p = reinterpret_cast<const unsigned char*>(data());
    return n_ ? std::vector<unsigned char>(p, p + n_ * sizeof(T)) : std::vector<unsigned char>();
  }
  void restore(const std::vector<unsigned char>& c) {
    if (n_) std::memcpy(static_cast<void*>(data()), c.data(), c.size());
  }

 private:
  void release() {
    if (n_) soslora_emu::device_memory(data(), n_ * sizeof(T), false);
    n_ = 0;
    bytes_.clear();
  }
  size_t n_;
  std::vector<unsigned char> bytes_;
};

inline bool same_bits(const void* a, const void* b, size_t bytes) {
  return std::memcmp(a, b, bytes) == 0;
}

// ---- random data ----------------------------------------------------------------------------------
inline std::mt19937_64& rng() {
  static std::mt19937_64 g(20240611);
  return g;
}
inline double uniform(double lo = -1, double hi = 1) {
  return std::uniform_real_distribution<double>(lo, hi)(rng());
}

// ---- checks and the results table -----------------------------------------------------------------
// An element check: |got - ref| <= bound, NaN failing. `worst` keeps the largest ratio.
struct Check {
  bool ok = true;
  double worst = 0;  // max |got - ref| / bound
  ld err_sq = 0, ref_sq = 0;  // for the relative Frobenius error
  std::string detail;
  void element(ld got, ld ref, ld bound, const std::string& where) {
    const ld err = std::fabs(got - ref);
    err_sq += err * err, ref_sq += ref * ref;
    const double ratio = bound > 0 ? double(err / bound) : (err == 0 ? 0.0 : INFINITY);
    if (!(err <= bound)) {
      if (ok) {
        char buf[256];
        std::snprintf(buf, sizeof buf, "%s: got %.9Lg, expected %.9Lg (bound %.3Lg)",
                      where.c_str(), got, ref, bound);
        detail = buf;
      }
      ok = false;
      worst = std::isnan(ratio) ? INFINITY : std::max(worst, ratio);
      return;
    }
    worst = std::max(worst, ratio);
  }
  void fail(const std::string& why) {
    if (ok) detail = why;
    ok = false;
  }
};

struct Tally {
  int cases = 0, failed = 0;
  double worst = 0, frobenius = 0;  // max err/bound, max relative Frobenius error
};

struct Results {
  std::map<std::pair<std::string, std::string>, Tally> table;  // (launcher, dtype)
  std::vector<std::string> failures;
  uint64_t shuffle = 0;  // with --shuffle: every case runs again in a shuffled order
  int total = 0;
};
Results& results();

// Runs one case: reset() puts inputs/outputs in their initial state, launch() calls the
// launcher, check() compares with the reference, outputs() snapshots the results. With
// --shuffle the case runs again in a shuffled block/thread order: the outputs must be the same
// bits when `reproducible`, else pass check() again (split-K float atomics add in another order).
void run_case(const std::string& launcher, const char* dtype, const std::string& description,
              bool reproducible, const std::function<void()>& reset,
              const std::function<cudaError_t()>& launch, const std::function<Check()>& check,
              const std::function<std::vector<unsigned char>()>& outputs);

// A case whose launcher must refuse its arguments with `expected`.
void expect_error(const std::string& launcher, const std::string& description,
                  cudaError_t expected, const std::function<cudaError_t()>& launch);
