// What merge.cpp (the ops, the ATen form) and merge_cpu.cpp (the CPU loops) share.
#pragma once
#include "soslora.h"
#include "weight_lines.h"

namespace soslora {

// Bands of about this many values: the update of a band stays in the cache while it is added.
constexpr int64_t kBandElements = int64_t{1} << 16;

// How a weight is swept (weight_lines.h): lines along the dimension whose values are adjacent
// in memory (rows for a row-major weight, columns for a transposed one), else rows.
lines::Geometry geometry_of(const Tensor& w);

// The stats tensor (soslora.h), on the CPU.
Tensor stats_of(uint64_t row_sum, uint64_t col_sum, double max_abs, int64_t count);

// The slack of the merge guard's bound (merge_guard.py's _BOUND_SLACK): the rounding of the
// accumulation, far inside it.
constexpr double kBoundSlack = 1.0 + 1.0 / 1024;

// The CPU loops, for a CPU weight of one of the four dtypes with at least one element (the
// ops have checked the arguments); A_acc [r, in] and Bs_acc [out, r] in the accumulation
// dtype.
Tensor weight_stats_cpu(const Tensor& weight);
Tensor merge_cpu(Tensor& weight, const Tensor& A_acc, const Tensor& Bs_acc, double alpha);
// update_bound's value, by loops (NaN or Inf where a factor is not finite).
double update_bound_cpu(const Tensor& A_acc, const Tensor& Bs_acc, double alpha);

}  // namespace soslora
