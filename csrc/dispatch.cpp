// The measured choice between a hand-written kernel and ATen (see dispatch.h).
#include "dispatch.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <mutex>
#include <sstream>
#include <vector>

namespace soslora {
namespace {

// Timings per implementation after one untimed warm-up call each (which also lets cuBLAS pick
// its algorithm and the allocator settle); the smallest counts, the two alternate so that a
// clock-speed change does not favour one.
constexpr int kTimings = 3;

std::mutex g_mutex;
std::map<std::string, Choice>& cache() {
  static std::map<std::string, Choice> choices;
  return choices;
}

bool cached(const std::string& key, Impl& impl) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  const auto it = cache().find(key);
  if (it == cache().end()) return false;
  impl = it->second.impl;
  return true;
}

Impl measure_and_cache(const std::string& key, const std::function<double(Impl)>& time_ms) {
  time_ms(Impl::kKernel);
  time_ms(Impl::kLibrary);
  double kernel = std::numeric_limits<double>::infinity(), library = kernel;
  for (int i = 0; i < kTimings; ++i) {
    kernel = std::min(kernel, time_ms(Impl::kKernel));
    library = std::min(library, time_ms(Impl::kLibrary));
  }
  // A tie goes to ATen: the kernel must earn its place.
  const Choice choice{kernel < library ? Impl::kKernel : Impl::kLibrary, kernel, library};
  const std::lock_guard<std::mutex> lock(g_mutex);
  return cache().emplace(key, choice).first->second.impl;  // the first measurement stands
}

}  // namespace

Impl decide(const std::string& key, bool capturing, const std::function<double(Impl)>& time_ms) {
  switch (cuda_path()) {
    case CudaPath::kKernels: return Impl::kKernel;
    case CudaPath::kAten: return Impl::kLibrary;
    case CudaPath::kAuto: break;
  }
  if (at::globalContext().deterministicAlgorithms()) return Impl::kLibrary;
  Impl impl;
  if (cached(key, impl)) return impl;
  if (capturing) return Impl::kLibrary;
  return measure_and_cache(key, time_ms);
}

std::string shape_class(const char* op, const Tensor& like, std::initializer_list<int64_t> dims) {
  std::ostringstream key;
  key << op << ' ' << like.device() << ' ' << like.scalar_type();
  bool first = true;
  for (int64_t d : dims) {
    // N (first) varies from batch to batch: its power-of-two class shares one measurement.
    if (first && d > 1) d = int64_t{1} << (64 - __builtin_clzll(static_cast<uint64_t>(d - 1)));
    key << (first ? ' ' : 'x') << d;
    first = false;
  }
  return key.str();
}

Impl choose_impl(const char* op, const Tensor& like, std::initializer_list<int64_t> dims,
                 const std::function<void(Impl)>& trial) {
  if (!have_cuda_kernels(like)) return Impl::kLibrary;
#ifdef SOSLORA_WITH_CUDA
  return decide(shape_class(op, like, dims), stream_capturing(like), [&](Impl impl) {
    synchronize_device(like);
    const auto start = std::chrono::steady_clock::now();
    trial(impl);
    synchronize_device(like);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  });
#else
  return Impl::kLibrary;
#endif
}

std::map<std::string, Choice> measured_choices() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  return cache();
}

void clear_measured_choices() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  cache().clear();
}

}  // namespace soslora
