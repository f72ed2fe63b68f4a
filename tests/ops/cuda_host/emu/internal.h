// Shared between the emulator's scheduler (emu.cpp) and its warp-collective checks (warp.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <source_location>
#include <string>

#include <vector_types.h>  // dim3

namespace soslora_emu {

int current_thread();  // linear index in the block of the running thread, -1 outside a kernel
std::string describe_thread(int thread);
std::string where_str(const std::source_location& where);

void warps_begin_block(unsigned threads);  // forgets the previous block's operations
void warps_end_block();                    // every lane of a warp issued as many as the others
uint64_t wmma_ops();                       // warp-level operations so far

void pipelines_begin_block(unsigned threads);  // cp.async state (pipeline.cpp)
void pipelines_end_block();                    // no thread left copies in flight
uint64_t pipeline_copies();                    // cp.async copies so far
bool in_shared(const void* p, size_t bytes);   // inside one of the block's __shared__ arrays

void races_begin_launch(uint64_t blocks);  // races between blocks (races.cpp)
void races_begin_block(const dim3& block);
void races_end_block();
uint64_t race_checked_launches();
uint64_t race_skipped_launches();

}  // namespace soslora_emu
