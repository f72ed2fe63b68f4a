// Dropout regenerated inside a kernel: the mask of a physical [*, cols] tensor (kernels.h,
// Matrix; through its index maps, the tensor they address) decided per element from the Philox
// seed (philox.h), never stored.
#pragma once
#include <cstdint>

#include "../philox.h"
#include "kernels.h"
#include "numeric.cuh"

namespace soslora::cuda {

template <typename Acc> struct DeviceDropout {
  const int64_t* seed = nullptr;  // device {seed, offset}; nullptr: no dropout
  uint32_t threshold = 0;
  Acc keep = 1;  // 1/(1-p) rounded to the element type, as the CPU path multiplies
  int64_t cols = 0;

  __device__ __forceinline__ bool active() const { return seed != nullptr; }
  __device__ __forceinline__ bool kept(int64_t i, int64_t j) const {
    return dropout_keep(static_cast<uint64_t>(seed[0]), static_cast<uint64_t>(seed[1]),
                        static_cast<uint64_t>(i * cols + j), threshold);
  }
  // v, or its dropped value: zero or v * keep.
  __device__ __forceinline__ Acc apply(int64_t i, int64_t j, Acc v) const {
    if (!active()) return v;
    return kept(i, j) ? v * keep : Acc(0);
  }
};

// The dropout a Matrix describes, for elements of type T.
template <typename T, typename Acc> DeviceDropout<Acc> device_dropout(const Matrix& m) {
  DeviceDropout<Acc> d;
  if (m.dropout_seed == nullptr || m.dropout_p <= 0) return d;
  d.seed = m.dropout_seed;
  d.threshold = dropout_threshold(m.dropout_p);
  d.keep = static_cast<Acc>(static_cast<double>(from_double<T>(1.0 / (1.0 - m.dropout_p))));
  d.cols = m.col_map != nullptr && m.col_extent ? m.col_extent : m.cols;
  return d;
}

}  // namespace soslora::cuda
