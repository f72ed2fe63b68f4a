// cp.async emulation (cuda_pipeline_primitives.h): per thread, the copies issued since its last
// commit and its committed groups, oldest first. A copy snapshots its source at issue and
// poisons its destination; a wait lands the groups it covers.
#include <cstring>
#include <deque>
#include <vector>

#include "cuda_emu.h"
#include "internal.h"

namespace soslora_emu {
namespace {

struct Copy {
  unsigned char* dst;
  std::vector<unsigned char> bytes;  // the source bytes, then the zero fill
};
struct ThreadPipeline {
  std::vector<Copy> open;                // issued, not committed
  std::deque<std::vector<Copy>> groups;  // committed, not yet waited for
};

std::vector<ThreadPipeline> threads;
uint64_t copies = 0;

ThreadPipeline& mine(const char* what, const std::source_location& where) {
  const int t = current_thread();
  if (t < 0) fatal_at(where, std::string(what) + " outside a kernel");
  return threads[t];
}

}  // namespace

void pipelines_begin_block(unsigned n) {
  threads.clear();
  threads.resize(n);
}

void pipelines_end_block() {
  for (size_t t = 0; t < threads.size(); ++t) {
    const ThreadPipeline& p = threads[t];
    size_t pending = p.open.size();
    for (const auto& g : p.groups) pending += g.size();
    if (pending != 0)
      fatal(describe_thread(int(t)) + " exited with " + std::to_string(pending) +
            " cp.async copies never waited for (__pipeline_wait_prior)");
  }
}

uint64_t pipeline_copies() { return copies; }

void pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill,
                           const std::source_location& where) {
  ThreadPipeline& p = mine("__pipeline_memcpy_async", where);
  if (size != 4 && size != 8 && size != 16)
    fatal_at(where, "__pipeline_memcpy_async: size " + std::to_string(size) +
                        " is not 4, 8 or 16 bytes");
  if (zfill > size)
    fatal_at(where, "__pipeline_memcpy_async: zfill " + std::to_string(zfill) +
                        " exceeds the size " + std::to_string(size));
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0)
    fatal_at(where, "__pipeline_memcpy_async: source or destination not aligned to " +
                        std::to_string(size) + " bytes");
  if (!in_shared(dst, size))
    fatal_at(where, "__pipeline_memcpy_async: the destination is not inside a __shared__ array");
  if (in_shared(src, 1))
    fatal_at(where, "__pipeline_memcpy_async: the source is in shared memory, not global");
  Copy c{static_cast<unsigned char*>(dst), std::vector<unsigned char>(size, 0)};
  if (size > zfill) std::memcpy(c.bytes.data(), src, size - zfill);
  std::memset(dst, 0xFF, size);
  p.open.push_back(std::move(c));
  ++copies;
}

void pipeline_commit(const std::source_location& where) {
  ThreadPipeline& p = mine("__pipeline_commit", where);
  p.groups.push_back(std::move(p.open));
  p.open.clear();
}

void pipeline_wait_prior(size_t prior, const std::source_location& where) {
  ThreadPipeline& p = mine("__pipeline_wait_prior", where);
  while (p.groups.size() > prior) {
    for (const Copy& c : p.groups.front()) std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
    p.groups.pop_front();
  }
}

}  // namespace soslora_emu
