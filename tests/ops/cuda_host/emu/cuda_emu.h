// Host emulation of the CUDA execution model, force-included (g++ -include) ahead of the kernel
// sources that rewrite.py copied (launches and __shared__ rewritten, nothing else). CUDA's own
// headers supply the types (dim3, cudaError_t, __half, __nv_bfloat16: host implementations);
// this file adds what device code uses: the built-in indices, __syncthreads, atomics, device
// math, and the launch that runs every block's threads as cooperative fibers (emu.cpp).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>  // libstdc++: float and double overloads of sqrt etc. in the global namespace

#include <cstddef>
#include <cstdint>
#include <source_location>
#include <string>
#include <tuple>

#include "mma.h"  // the nvcuda::wmma shim (this directory is ahead of CUDA's include dir)

#define __launch_bounds__(...)

#if defined(SOSLORA_EMU_CUDA_ARCH)  // a device pass for that architecture (after CUDA's headers)
#define __CUDA_ARCH__ SOSLORA_EMU_CUDA_ARCH
#endif

namespace soslora_emu {

// The running thread's built-ins; the scheduler sets them before it resumes a thread.
struct Builtins {
  uint3 thread_idx{}, block_idx{};
  dim3 block_dim{1, 1, 1}, grid_dim{1, 1, 1};
};
extern Builtins g_builtins;

struct LaunchConfig {
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr)
      : grid(g), block(b), shmem(s), stream(st) {}
};

struct LaunchSite {
  const char* kernel;
  const char* file;
  int line;
};

// Runs the grid: thread_main(params) once per thread, blocks one after another.
void run_grid(const LaunchConfig& config, const LaunchSite& site, void (*thread_main)(void*),
              void* params);

template <class Call, class Params> void thread_main(void* params) {
  std::apply(Call{}, *static_cast<Params*>(params));  // every thread gets its own copies
}

// kernel<<<config>>>(args) after rewrite.py: `call` is a captureless lambda that calls the
// kernel, so template arguments are deduced from the arguments as nvcc does.
template <class Call, class... Args>
void launch(const LaunchConfig& config, const char* kernel, const char* file, int line, Call,
            Args... args) {
  std::tuple<Args...> params(args...);
  run_grid(config, {kernel, file, line}, &thread_main<Call, std::tuple<Args...>>, &params);
}

// A __shared__ array (rewrite.py: a static local plus this call). The first thread of a block
// to declare it fills it with 0xFF bytes (NaN in every floating type), so reads before writes
// show up as NaN.
void shared_array(void* data, size_t bytes, const char* name);

// Warp-collective operations (mma.h). Every lane of a warp must issue the same sequence of them
// with equal `key` bytes. collective_begin returns nullptr to the first lane to arrive (it
// computes the result and publishes it), else the first lane's published result.
const void* collective_begin(const char* what, const std::source_location& where,
                             const void* key, size_t key_bytes);
void collective_publish(const void* result, size_t bytes);
// A lane's own result must equal the first lane's (e.g. the data a load read).
void collective_check(const void* first, const void* mine, size_t bytes, const char* what,
                      const std::source_location& where);

[[noreturn]] void fatal(const std::string& message);
[[noreturn]] void fatal_at(const std::source_location& where, const std::string& message);

// Driver controls: order shuffling (0 = in order; also SOSLORA_EMU_SHUFFLE), the description of
// the current test case (printed with every emulator error), statistics.
void set_shuffle_seed(uint64_t seed);
void set_case(const std::string& description);
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, switches = 0, wmma_ops = 0,
           async_copies = 0, race_checked = 0, race_skipped = 0;
};
Stats stats();

}  // namespace soslora_emu

#define threadIdx (static_cast<const uint3&>(::soslora_emu::g_builtins.thread_idx))
#define blockIdx (static_cast<const uint3&>(::soslora_emu::g_builtins.block_idx))
#define blockDim (static_cast<const dim3&>(::soslora_emu::g_builtins.block_dim))
#define gridDim (static_cast<const dim3&>(::soslora_emu::g_builtins.grid_dim))

// A real barrier: the calling thread waits until every live thread of its block arrived at the
// same __syncthreads() (same call site), else the emulator stops with an error.
void __syncthreads(std::source_location where = std::source_location::current());

// Lanes of a warp run one after another between barriers, and every lane holds the whole wmma
// tile (mma.h): a lane reads back only what it stored itself, so the warp barrier has nothing to
// order here (whether one is missing cannot be shown: README.md).
inline void __syncwarp(unsigned = 0xffffffffu) {}

// Threads run one at a time, so a plain read-modify-write is atomic; the bytes are noted so
// that the race check between blocks (races.cpp) accepts other blocks' atomics on them.
namespace soslora_emu {
void note_atomic(const void* address, size_t bytes);
// Registers (add) or forgets device memory: the driver's buffers, whose changes per block are
// compared between the blocks of a launch.
void device_memory(void* data, size_t bytes, bool add);
}  // namespace soslora_emu
inline float atomicAdd(float* address, float value) {
  soslora_emu::note_atomic(address, sizeof(float));
  const float old = *address;
  *address = old + value;
  return old;
}
inline double atomicAdd(double* address, double value) {
  soslora_emu::note_atomic(address, sizeof(double));
  const double old = *address;
  *address = old + value;
  return old;
}
inline int atomicAdd(int* address, int value) {
  soslora_emu::note_atomic(address, sizeof(*address));
  const int old = *address;
  *address = old + value;
  return old;
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  soslora_emu::note_atomic(address, sizeof(*address));
  const unsigned old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  soslora_emu::note_atomic(address, sizeof(*address));
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicMax(unsigned long long* address, unsigned long long value) {
  soslora_emu::note_atomic(address, sizeof(*address));
  const unsigned long long old = *address;
  *address = old > value ? old : value;
  return old;
}

// A trap stops the kernel (on a GPU: a launch failure); here it stops the run with the site.
[[noreturn]] inline void __trap(std::source_location where = std::source_location::current()) {
  ::soslora_emu::fatal_at(where, "__trap() called");
}

// The C++ overload that cuda_runtime.h declares for nvcc (__CUDACC__) only.
template <class T> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

// Device math that CUDA provides unqualified (max/min: fmax semantics, NaN-ignoring).
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
