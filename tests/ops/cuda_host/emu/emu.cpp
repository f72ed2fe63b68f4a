// The emulator's runtime: blocks run one after another; a block's threads are ucontext fibers
// that run one at a time and switch only at __syncthreads (a real barrier). A block whose first
// thread exits without reaching a barrier runs its other threads as plain calls (a barrier there
// would be a thread waiting for one that has exited: reported), which keeps grid-stride kernels
// cheap. Errors stop the process with exit status 2 and a message naming the case, kernel,
// launch site, block and thread.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_emu.h"
#include "internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace soslora_emu {

Builtins g_builtins;

namespace {

constexpr size_t kStackBytes = 256 << 10;  // per fiber (ASan frames are large), plus a guard page
constexpr size_t kSharedLimit = 48 << 10;  // static __shared__ bytes per block

enum class State { kReady, kWaiting, kDone };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  State state = State::kReady;
  std::source_location barrier;  // where it waits
  void* fake_stack = nullptr;    // ASan's bookkeeping for this fiber
};

struct Runtime {
  const LaunchSite* site = nullptr;
  void (*thread_main)(void*) = nullptr;
  void* params = nullptr;
  dim3 grid, block;
  unsigned threads = 0;
  int current = -1;              // linear index of the running thread, -1 outside a kernel
  int exited_first = -1;         // direct mode: the thread that exited without a barrier
  std::vector<Fiber> fibers;     // indexed by linear thread index
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  std::vector<std::pair<void*, size_t>> shared;
  size_t shared_bytes = 0;
  uint64_t seed = 0;
  std::mt19937_64 rng;
  cudaError_t last_error = cudaSuccess;
  std::string case_description;
  Stats stats;
} rt;

void set_thread(int t) {
  rt.current = t;
  const unsigned bx = rt.block.x, by = rt.block.y;
  g_builtins.thread_idx = {t % bx, t / bx % by, t / (bx * by)};
}

void fiber_entry() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &rt.scheduler_stack, &rt.scheduler_stack_size);
#endif
  rt.thread_main(rt.params);
  Fiber& f = rt.fibers[rt.current];
  f.state = State::kDone;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, rt.scheduler_stack, rt.scheduler_stack_size);
#endif
  swapcontext(&f.context, &rt.scheduler);  // never resumed: the next block makes a new context
}

void start_fiber(int t) {
  Fiber& f = rt.fibers[t];
  if (f.stack == nullptr) {
    const size_t page = sysconf(_SC_PAGESIZE);
    void* base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) fatal("mmap of a fiber stack failed");
    mprotect(base, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    f.stack = static_cast<char*>(base) + page;
  }
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_entry, 0);
  f.state = State::kReady;
}

void resume(int t) {
  Fiber& f = rt.fibers[t];
  set_thread(t);
  ++rt.stats.switches;
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  swapcontext(&rt.scheduler, &f.context);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  rt.current = -1;
}

void run_fibers(std::vector<int>& order) {
  for (size_t i = 1; i < order.size(); ++i) start_fiber(order[i]);
  size_t from = 1;  // order[0] has run already, up to its first barrier
  for (;;) {
    for (size_t i = from; i < order.size(); ++i)
      if (rt.fibers[order[i]].state == State::kReady) resume(order[i]);
    int waiting = -1, done = -1;
    for (int t : order) {
      const Fiber& f = rt.fibers[t];
      if (f.state == State::kDone && done < 0) done = t;
      if (f.state != State::kWaiting) continue;
      if (waiting < 0) waiting = t;
      const Fiber& w = rt.fibers[waiting];
      if (std::string_view(f.barrier.file_name()) != w.barrier.file_name() ||
          f.barrier.line() != w.barrier.line()) {
        rt.current = t;
        fatal(describe_thread(t) + " waits at __syncthreads() " + where_str(f.barrier) +
              " while " + describe_thread(waiting) + " waits at " + where_str(w.barrier));
      }
    }
    if (waiting < 0) return;  // every thread has exited
    if (done >= 0) {
      rt.current = waiting;
      fatal(describe_thread(waiting) + " waits at __syncthreads() " +
            where_str(rt.fibers[waiting].barrier) + " but " + describe_thread(done) +
            " has exited: it can never arrive");
    }
    ++rt.stats.barriers;
    for (int t : order) rt.fibers[t].state = State::kReady;
    if (rt.seed != 0) std::shuffle(order.begin(), order.end(), rt.rng);
    from = 0;
  }
}

void run_block(const dim3& b) {
  races_begin_block(b);
  g_builtins.block_idx = {b.x, b.y, b.z};
  rt.shared.clear();
  rt.shared_bytes = 0;
  warps_begin_block(rt.threads);
  pipelines_begin_block(rt.threads);
  std::vector<int> order(rt.threads);
  std::iota(order.begin(), order.end(), 0);
  if (rt.seed != 0) std::shuffle(order.begin(), order.end(), rt.rng);
  start_fiber(order[0]);
  resume(order[0]);
  if (rt.fibers[order[0]].state == State::kDone) {
    rt.exited_first = order[0];  // direct mode: no thread may reach a barrier now
    for (size_t i = 1; i < order.size(); ++i) {
      set_thread(order[i]);
      rt.thread_main(rt.params);
    }
    rt.exited_first = -1;
    rt.current = -1;
  } else {
    run_fibers(order);
  }
  warps_end_block();
  pipelines_end_block();
  races_end_block();
  ++rt.stats.blocks;
}

}  // namespace

std::string describe_thread(int t) {
  if (t < 0) return "host";
  const unsigned bx = rt.block.x, by = rt.block.y;
  char buf[160];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) [warp %d lane %d]", t % bx, t / bx % by,
                t / (bx * by), t / 32, t % 32);
  return buf;
}

std::string where_str(const std::source_location& w) {
  return std::string(w.file_name()) + ":" + std::to_string(w.line());
}

int current_thread() { return rt.current; }

void fatal(const std::string& message) {
  std::fprintf(stderr, "\nEMULATOR ERROR: %s\n", message.c_str());
  if (rt.site != nullptr)
    std::fprintf(stderr, "  in kernel %s launched at %s:%d, block (%u,%u,%u), %s\n",
                 rt.site->kernel, rt.site->file, rt.site->line, g_builtins.block_idx.x,
                 g_builtins.block_idx.y, g_builtins.block_idx.z, describe_thread(rt.current).c_str());
  std::fprintf(stderr, "  case: %s\n", rt.case_description.c_str());
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(2);
}

void fatal_at(const std::source_location& where, const std::string& message) {
  fatal(where_str(where) + ": " + message);
}

void run_grid(const LaunchConfig& c, const LaunchSite& site, void (*thread_main)(void*),
              void* params) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.y > 65535 ||
      c.grid.z > 65535 || c.grid.x > 0x7fffffffu || threads == 0 || threads > 1024 ||
      c.block.z > 64) {
    rt.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (c.shmem != 0) fatal("dynamic shared memory is not emulated");
  if (rt.current >= 0) fatal("kernel launch from device code is not emulated");
  rt.site = &site;
  rt.thread_main = thread_main;
  rt.params = params;
  rt.grid = c.grid;
  rt.block = c.block;
  rt.threads = unsigned(threads);
  g_builtins.block_dim = c.block;
  g_builtins.grid_dim = c.grid;
  if (rt.fibers.size() < threads) rt.fibers.resize(threads);
  const uint64_t blocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  races_begin_launch(blocks);
  std::vector<uint64_t> order;
  if (rt.seed != 0) {
    order.resize(blocks);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rt.rng);
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = rt.seed != 0 ? order[i] : i;
    run_block(dim3(unsigned(b % c.grid.x), unsigned(b / c.grid.x % c.grid.y),
                   unsigned(b / (uint64_t(c.grid.x) * c.grid.y))));
  }
  rt.stats.threads += blocks * threads;
  ++rt.stats.launches;
  rt.site = nullptr;
}

void shared_array(void* data, size_t bytes, const char* name) {
  if (rt.current < 0) fatal(std::string("__shared__ ") + name + " used outside a kernel");
  for (const auto& s : rt.shared)
    if (s.first == data) return;
  rt.shared.emplace_back(data, bytes);
  rt.shared_bytes += bytes;
  if (rt.shared_bytes > kSharedLimit)
    fatal("static __shared__ memory of the block exceeds 48 KiB (" +
          std::to_string(rt.shared_bytes) + " bytes with " + name + ")");
  std::memset(data, 0xFF, bytes);
}

bool in_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const auto& s : rt.shared) {
    const auto* base = static_cast<const unsigned char*>(s.first);
    if (c >= base && c + bytes <= base + s.second) return true;
  }
  return false;
}

void set_shuffle_seed(uint64_t seed) {
  rt.seed = seed;
  rt.rng.seed(seed);
}

void set_case(const std::string& description) { rt.case_description = description; }

Stats stats() {
  Stats s = rt.stats;
  s.wmma_ops = wmma_ops();
  s.async_copies = pipeline_copies();
  s.race_checked = race_checked_launches();
  s.race_skipped = race_skipped_launches();
  return s;
}

}  // namespace soslora_emu

using soslora_emu::rt;

void __syncthreads(std::source_location where) {
  if (rt.current < 0) soslora_emu::fatal_at(where, "__syncthreads() outside a kernel");
  if (rt.exited_first >= 0)
    soslora_emu::fatal_at(where, "__syncthreads() reached while " +
                                     soslora_emu::describe_thread(rt.exited_first) +
                                     " has exited without reaching it: it can never arrive");
  auto& f = rt.fibers[rt.current];
  f.state = soslora_emu::State::kWaiting;
  f.barrier = where;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, rt.scheduler_stack, rt.scheduler_stack_size);
#endif
  swapcontext(&f.context, &rt.scheduler);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &rt.scheduler_stack, &rt.scheduler_stack_size);
#endif
}

extern "C" {
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = rt.last_error;
  rt.last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return rt.last_error; }
const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: {
      static char buf[32];
      std::snprintf(buf, sizeof buf, "cudaError(%d)", int(error));
      return buf;
    }
  }
}
const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  if (attr == nullptr || func == nullptr) return cudaErrorInvalidValue;
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;  // the host emulation always has "code" for the device
}
}

// SOSLORA_EMU_SHUFFLE=seed shuffles block order and each barrier's thread order.
namespace {
struct ShuffleFromEnv {
  ShuffleFromEnv() {
    if (const char* s = std::getenv("SOSLORA_EMU_SHUFFLE"))
      soslora_emu::set_shuffle_seed(std::strtoull(s, nullptr, 10));
  }
} shuffle_from_env;
}  // namespace
