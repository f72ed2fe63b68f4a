// Warp-collective operations (wmma, mma.h): the lanes of a warp run one after another between
// barriers, so the first lane to issue its n-th collective operation records it (what, where,
// the key bytes: pointers, ldm, fragment contents) and its result; every other lane's n-th
// operation must match the record, and takes or compares the result.
#include <algorithm>
#include <cstring>
#include <string_view>
#include <vector>

#include "cuda_emu.h"
#include "internal.h"

namespace soslora_emu {
namespace {

struct Record {  // one warp-collective operation, as the first lane issued it
  const char* what;
  std::source_location where;
  std::vector<unsigned char> key, result;
};

std::vector<std::vector<Record>> logs;  // per warp
std::vector<size_t> lane_ops;           // per thread: collective operations issued
size_t last_record = 0;                 // the record the first lane publishes into
unsigned block_threads = 0;
uint64_t total_ops = 0;

}  // namespace

void warps_begin_block(unsigned threads) {
  block_threads = threads;
  logs.resize((threads + 31) / 32);
  for (auto& log : logs) log.clear();
  lane_ops.assign(threads, 0);
}

void warps_end_block() {
  for (size_t w = 0; w < logs.size(); ++w) {
    const size_t first = w * 32, last = std::min<size_t>(first + 32, block_threads);
    for (size_t t = first; t < last; ++t)
      if (lane_ops[t] != logs[w].size())
        fatal(describe_thread(int(t)) + " issued " + std::to_string(lane_ops[t]) +
              " warp-collective operations, other lanes of its warp " +
              std::to_string(logs[w].size()));
  }
}

uint64_t wmma_ops() { return total_ops; }

const void* collective_begin(const char* what, const std::source_location& where,
                             const void* key, size_t key_bytes) {
  const int t = current_thread();
  if (t < 0) fatal_at(where, std::string(what) + " outside a kernel");
  auto& log = logs[t / 32];
  const size_t index = lane_ops[t]++;
  const auto* k = static_cast<const unsigned char*>(key);
  if (index == log.size()) {  // the first lane to get here
    ++total_ops;
    log.push_back({what, where, std::vector<unsigned char>(k, k + key_bytes), {}});
    last_record = index;
    return nullptr;
  }
  const Record& r = log[index];
  if (std::string_view(r.what) != what || r.where.line() != where.line() ||
      r.key.size() != key_bytes || std::memcmp(r.key.data(), key, key_bytes) != 0)
    fatal_at(where, describe_thread(t) + " issued wmma::" + what +
                        " as its warp-collective operation #" + std::to_string(index) +
                        " with other arguments than the first lane of its warp (wmma::" +
                        r.what + " at " + where_str(r.where) + "): divergent warp");
  return r.result.data();
}

void collective_publish(const void* result, size_t bytes) {
  auto& r = logs[current_thread() / 32][last_record];
  const auto* p = static_cast<const unsigned char*>(result);
  r.result.assign(p, p + bytes);
}

void collective_check(const void* first, const void* mine, size_t bytes, const char* what,
                      const std::source_location& where) {
  if (std::memcmp(first, mine, bytes) != 0)
    fatal_at(where, describe_thread(current_thread()) + ": wmma::" + what +
                        " read other data than the first lane of its warp: the memory changed "
                        "between the lanes' reads (a missing __syncthreads()?)");
}

}  // namespace soslora_emu
