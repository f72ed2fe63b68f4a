// The tile engine's loaders and epilogues for kernels.h's Matrix (strides, optional index maps,
// dropout regenerated per element): shared by the low-rank and the cluster kernels.
#pragma once
#include <cstdint>

#include "../philox.h"
#include "kernels.h"
#include "numeric.cuh"

namespace soslora::cuda {

// The dropout of a physical [*, cols] tensor, regenerated per element.
template <typename Acc> struct DeviceDropout {
  const int64_t* seed = nullptr;
  uint32_t threshold = 0;
  Acc keep = 1;  // 1/(1-p) rounded to the element type, as the CPU path multiplies
  int64_t cols = 0;

  __device__ __forceinline__ bool active() const { return seed != nullptr; }
  __device__ __forceinline__ bool kept(int64_t i, int64_t j) const {
    return dropout_keep(static_cast<uint64_t>(seed[0]), static_cast<uint64_t>(seed[1]),
                        static_cast<uint64_t>(i * cols + j), threshold);
  }
};

// Where element (i, j) of a Matrix lives: its physical row and column through the maps.
struct MatrixPlace {
  int64_t stride0 = 0, stride1 = 0;
  const int64_t* row_map = nullptr;
  const int64_t* col_map = nullptr;
  int64_t row_extent = 0, col_extent = 0;

  __device__ __forceinline__ static int64_t through(const int64_t* map, int64_t i, int64_t extent) {
    if (map == nullptr) return i;
    const int64_t v = map[i];
    if (v < 0 || v >= extent) __trap();  // never read or write outside the tensor
    return v;
  }
  __device__ __forceinline__ int64_t row(int64_t i) const { return through(row_map, i, row_extent); }
  __device__ __forceinline__ int64_t col(int64_t j) const { return through(col_map, j, col_extent); }
  __device__ __forceinline__ int64_t offset(int64_t row, int64_t col) const {
    return row * stride0 + col * stride1;
  }
  __host__ __device__ __forceinline__ bool mapped() const {
    return row_map != nullptr || col_map != nullptr;
  }
};

inline MatrixPlace place_of(const Matrix& m) {
  return {m.stride0, m.stride1, m.row_map, m.col_map, m.row_extent ? m.row_extent : m.rows,
          m.col_extent ? m.col_extent : m.cols};
}

template <typename T, typename Acc> DeviceDropout<Acc> device_dropout(const Matrix& m) {
  DeviceDropout<Acc> d;
  if (m.dropout_seed == nullptr || m.dropout_p <= 0) return d;
  d.seed = m.dropout_seed;
  d.threshold = dropout_threshold(m.dropout_p);
  d.keep = static_cast<Acc>(static_cast<double>(from_double<T>(1.0 / (1.0 - m.dropout_p))));
  d.cols = m.col_map != nullptr && m.col_extent ? m.col_extent : m.cols;
  return d;
}

// Loads element (i, j) of a Matrix (a transposed operand is a Matrix with swapped strides).
template <typename T, typename Acc> struct MatrixLoad {
  using Element = T;
  const T* data = nullptr;
  MatrixPlace place;
  DeviceDropout<Acc> dropout;

  __host__ __device__ __forceinline__ bool cols_contiguous() const { return place.stride1 == 1; }
  // Plain data (no map, no mask) with a unit stride along the inner dimension: byte-copyable.
  __device__ __forceinline__ const T* raw(bool cols_inner, int64_t& ld) const {
    if (dropout.active() || place.mapped()) return nullptr;
    if ((cols_inner ? place.stride1 : place.stride0) != 1) return nullptr;
    ld = cols_inner ? place.stride0 : place.stride1;
    return data;
  }
  __device__ __forceinline__ Acc operator()(int64_t i, int64_t j) const {
    const int64_t r = place.row(i), c = place.col(j);
    if (dropout.active() && !dropout.kept(r, c)) return Acc(0);
    const Acc v = to_acc<Acc>(data[place.offset(r, c)]);
    return dropout.active() ? v * dropout.keep : v;
  }
};

template <typename T, typename Acc> MatrixLoad<T, Acc> loader(const Matrix& m) {
  return {static_cast<const T*>(m.data), place_of(m), device_dropout<T, Acc>(m)};
}

// out(m, n) = [addend(m, n) +] D(alpha * v), rounded once to T; alpha is a device scalar (or
// none: 1), the addend a tensor of out's shape read through out's maps (or out itself).
template <typename T, typename Acc, bool kAdd> struct WriteEpilogue {
  T* data = nullptr;
  MatrixPlace place;
  DeviceDropout<Acc> dropout;
  const Acc* alpha = nullptr;
  const T* addend = nullptr;
  int64_t addend_stride0 = 0, addend_stride1 = 0;

  __device__ __forceinline__ void operator()(int64_t m, int64_t n, Acc v) const {
    const int64_t r = place.row(m), c = place.col(n);
    if (alpha != nullptr) v *= *alpha;
    if (dropout.active()) v = dropout.kept(r, c) ? v * dropout.keep : Acc(0);
    if constexpr (kAdd) v += to_acc<Acc>(addend[r * addend_stride0 + c * addend_stride1]);
    data[place.offset(r, c)] = round_to<T>(v);
  }
};

// The epilogue writing `out` (with its maps and dropout); kAdd adds `addend` (out's shape and
// maps; null: out itself, in place).
template <typename T, typename Acc, bool kAdd>
WriteEpilogue<T, Acc, kAdd> writer(const Matrix& out, const Acc* alpha = nullptr,
                                   const Matrix* addend = nullptr) {
  WriteEpilogue<T, Acc, kAdd> e;
  e.data = static_cast<T*>(const_cast<void*>(out.data));
  e.place = place_of(out);
  e.dropout = device_dropout<T, Acc>(out);
  e.alpha = alpha;
  const Matrix& a = addend != nullptr ? *addend : out;
  e.addend = static_cast<const T*>(a.data);
  e.addend_stride0 = a.stride0;
  e.addend_stride1 = a.stride1;
  return e;
}

// out[m * stride0 + n] += alpha * v atomically (split-K partial sums), alpha a device scalar or
// none (1).
template <typename Acc> struct AtomicAddEpilogue {
  Acc* data = nullptr;
  int64_t stride0 = 0;
  const Acc* alpha = nullptr;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, Acc v) const {
    atomicAdd(data + m * stride0 + n, alpha != nullptr ? v * *alpha : v);
  }
};

}  // namespace soslora::cuda
