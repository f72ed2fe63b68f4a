// Races between the blocks of a launch. Blocks run one after another here, so a plain `+=`
// that two blocks apply to one element (a split-K sum without atomics) gives the right sum,
// while on a GPU one update can be lost. So the bytes each block changes in device memory (the
// driver's buffers, registered by device_memory) are found by comparing them before and after
// the block, and two blocks of one launch changing the same byte is reported, unless both did
// it through atomics. Launches whose blocks x registered bytes exceed a budget are not checked
// (the grid-stride dropout over 16M elements).
#include <cstring>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cuda_emu.h"
#include "internal.h"

namespace soslora_emu {
namespace {

constexpr uint64_t kBudget = uint64_t(1) << 28;  // blocks x registered bytes per launch

struct Region {
  unsigned char* base;
  size_t bytes;
  std::vector<unsigned char> before;  // the region as the current block found it
};
struct Writer {
  dim3 block;
  bool atomic;
};

std::vector<Region> regions;
bool checking = false;
dim3 current_block;
std::unordered_map<const unsigned char*, Writer> writers;  // per launch: who changed each byte
std::unordered_set<const unsigned char*> atomic_bytes;     // per block
uint64_t checked = 0, skipped = 0;

std::string name(const dim3& b) {
  return "(" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) + ")";
}

}  // namespace

void device_memory(void* data, size_t bytes, bool add) {
  auto* p = static_cast<unsigned char*>(data);
  if (add) {
    regions.push_back({p, bytes, {}});
    return;
  }
  for (size_t i = 0; i < regions.size(); ++i)
    if (regions[i].base == p) {
      regions.erase(regions.begin() + i);
      return;
    }
}

void races_begin_launch(uint64_t blocks) {
  uint64_t bytes = 0;
  for (const Region& r : regions) bytes += r.bytes;
  writers.clear();
  checking = false;
  if (blocks < 2) return;  // nothing to race with
  checking = bytes * blocks <= kBudget;
  ++(checking ? checked : skipped);
}

void races_begin_block(const dim3& block) {
  if (!checking) return;
  current_block = block;
  atomic_bytes.clear();
  for (Region& r : regions) r.before.assign(r.base, r.base + r.bytes);
}

void races_end_block() {
  if (!checking) return;
  constexpr size_t kChunk = 64;
  for (const Region& r : regions) {
    for (size_t i = 0; i < r.bytes; ++i) {
      if (i % kChunk == 0 && i + kChunk <= r.bytes &&
          std::memcmp(r.base + i, r.before.data() + i, kChunk) == 0) {
        i += kChunk - 1;  // an unchanged chunk
        continue;
      }
      if (r.base[i] == r.before[i]) continue;
      const unsigned char* byte = r.base + i;
      const bool atomic = atomic_bytes.count(byte) != 0;
      auto [it, fresh] = writers.try_emplace(byte, Writer{current_block, atomic});
      if (fresh) continue;
      Writer& w = it->second;
      const bool same = w.block.x == current_block.x && w.block.y == current_block.y &&
                        w.block.z == current_block.z;
      if (!same && !(w.atomic && atomic))
        fatal("blocks " + name(w.block) + " and " + name(current_block) +
              " both changed byte " + std::to_string(i) + " of a " + std::to_string(r.bytes) +
              "-byte device buffer, not both through atomics: a race between blocks on a GPU "
              "(an update can be lost)");
      w = {current_block, w.atomic && atomic};
    }
  }
}

void note_atomic(const void* address, size_t bytes) {
  if (!checking) return;
  const auto* p = static_cast<const unsigned char*>(address);
  for (size_t i = 0; i < bytes; ++i) atomic_bytes.insert(p + i);
}

uint64_t race_checked_launches() { return checked; }
uint64_t race_skipped_launches() { return skipped; }

}  // namespace soslora_emu
