// Which implementation runs an op on a CUDA device: the hand-written kernel or ATen (cuBLAS).
//
// "auto" (the default CudaPath) measures both on the first call of each shape class and keeps
// the faster for the rest of the process, as cuBLASLt's heuristics cache or Triton's autotuner
// do, so an untuned kernel on some GPU can never make a step slower than cuBLAS. "kernels" and
// "aten" (set_cuda_path) force one. A choice is keyed by (op, device, dtype, shape class): N
// rounded up to a power of two, the other sizes exact. Two cases never measure:
//   - torch.use_deterministic_algorithms(True): ATen, always (a measured choice could differ
//     between runs, and with it the rounding);
//   - a stream capturing a CUDA graph (it cannot wait for a timing): the cached choice if there
//     is one, else ATen, not cached.
#pragma once
#include <functional>
#include <initializer_list>
#include <map>
#include <string>

#include "soslora.h"

namespace soslora {

enum class Impl { kKernel, kLibrary };

// The implementation to run `op` with, for tensors like `like` of sizes `dims` (N first).
// `trial(impl)` runs one implementation once, with no effect on the op's result (a functional
// op's own call, or an in-place op's call on a scratch copy); it is timed on a miss under
// "auto". Returns kLibrary where the kernels do not serve `like` (have_cuda_kernels).
Impl choose_impl(const char* op, const Tensor& like, std::initializer_list<int64_t> dims,
                 const std::function<void(Impl)>& trial);

// A functional op's implementation by choose_impl: kernel() or library(), which return the same
// result; the trial runs are those calls too.
template <class Kernel, class Library>
auto dispatch(const char* op, const Tensor& like, std::initializer_list<int64_t> dims,
              Kernel&& kernel, Library&& library) {
  const Impl impl = choose_impl(op, like, dims, [&](Impl trial) {
    if (trial == Impl::kKernel) kernel();
    else library();
  });
  return impl == Impl::kKernel ? kernel() : library();
}

// Every measured choice so far: "op device dtype dims" -> "kernel" or "aten", with both times.
struct Choice {
  Impl impl;
  double kernel_ms, library_ms;
};
std::map<std::string, Choice> measured_choices();
void clear_measured_choices();

// The rule itself, without a device: choose_impl's decision for the shape class `key` once the
// kernels serve the device; `time_ms(impl)` gives one timing of impl. Exposed so that the rule
// is tested on the CPU.
Impl decide(const std::string& key, bool capturing, const std::function<double(Impl)>& time_ms);
// The key of a shape class (op, device, dtype, dims with N rounded up to a power of two).
std::string shape_class(const char* op, const Tensor& like, std::initializer_list<int64_t> dims);

}  // namespace soslora
