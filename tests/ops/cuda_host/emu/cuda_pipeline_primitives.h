// Shim for CUDA's <cuda_pipeline_primitives.h>: cp.async through __pipeline_memcpy_async,
// __pipeline_commit and __pipeline_wait_prior, per thread as the hardware does it. A copy reads
// its source when it is issued but lands in shared memory only when a wait covers its group;
// until then its destination holds NaN bytes (0xFF). So data read before its wait, a buffer
// refilled while another thread still reads it, or a copy landing on top of a newer write all
// show up as NaN or as a wmma lane mismatch. Checked at once: sizes (4, 8 or 16 bytes), zfill,
// alignment of both pointers to the size, the destination inside a __shared__ array and the
// source outside; and a thread may not exit with copies still in flight.
#pragma once
#include <cstddef>
#include <source_location>

namespace soslora_emu {
void pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill,
                           const std::source_location& where);
void pipeline_commit(const std::source_location& where);
void pipeline_wait_prior(size_t prior, const std::source_location& where);
}  // namespace soslora_emu

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global,
                                    size_t size_and_align, size_t zfill = 0,
                                    std::source_location where = std::source_location::current()) {
  soslora_emu::pipeline_memcpy_async(dst_shared, src_global, size_and_align, zfill, where);
}
inline void __pipeline_commit(std::source_location where = std::source_location::current()) {
  soslora_emu::pipeline_commit(where);
}
inline void __pipeline_wait_prior(size_t prior,
                                  std::source_location where = std::source_location::current()) {
  soslora_emu::pipeline_wait_prior(prior, where);
}
