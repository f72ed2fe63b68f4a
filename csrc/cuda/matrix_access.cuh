// The tile engine's loaders and epilogues for kernels.h's Matrix (strides, optional index maps,
// dropout regenerated per element): shared by the low-rank and the cluster kernels.
#pragma once
#include <cstdint>
#include <cstring>

#include "dropout.cuh"
#include "kernels.h"
#include "numeric.cuh"

namespace soslora::cuda {

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
  __device__ __forceinline__ int64_t row(int64_t i) const {
    return through(row_map, i, row_extent);
  }
  __device__ __forceinline__ int64_t col(int64_t j) const {
    return through(col_map, j, col_extent);
  }
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

// Loads element (i, j) of a Matrix (a transposed operand is a Matrix with swapped strides).
template <typename T, typename Acc> struct MatrixLoad {
  using Element = T;
  const T* data = nullptr;
  MatrixPlace place;
  DeviceDropout<Acc> dropout;

  __host__ __device__ __forceinline__ bool cols_contiguous() const { return place.stride1 == 1; }
  // Unmapped data with a unit stride along the inner dimension: byte-copyable (the tile engine
  // then applies the dropout, adjust(), to the copies).
  __device__ __forceinline__ const T* raw(bool cols_inner, int64_t& ld) const {
    if (place.mapped() || (cols_inner ? place.stride1 : place.stride0) != 1) return nullptr;
    ld = cols_inner ? place.stride0 : place.stride1;
    return data;
  }
  __device__ __forceinline__ bool exact() const { return !dropout.active(); }
  __device__ __forceinline__ Acc adjust(int64_t r, int64_t c, Acc v) const {
    if (!dropout.active()) return v;
    return dropout.kept(r, c) ? v * dropout.keep : Acc(0);
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

// One 16-byte load or store (both pointers 16-byte aligned).
__device__ __forceinline__ void copy16(void* to, const void* from) {
  memcpy(__builtin_assume_aligned(to, 16), __builtin_assume_aligned(from, 16), 16);
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

  __device__ __forceinline__ Acc value(int64_t r, int64_t c, Acc v, Acc scale) const {
    v *= scale;
    if (dropout.active()) v = dropout.kept(r, c) ? v * dropout.keep : Acc(0);
    return v;
  }
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, Acc v) const {
    const int64_t r = place.row(m), c = place.col(n);
    v = value(r, c, v, alpha != nullptr ? *alpha : Acc(1));
    if constexpr (kAdd) v += to_acc<Acc>(addend[r * addend_stride0 + c * addend_stride1]);
    data[place.offset(r, c)] = round_to<T>(v);
  }
  // Results (m, n .. n + count - 1): 16 bytes at a time where the output (and the addend) is
  // unmapped, with unit column stride, 16-byte aligned.
  template <typename V>
  __device__ __forceinline__ void row(int64_t m, int64_t n, const V* v, int count) const {
    constexpr int kVec = 16 / sizeof(T);
    T* out = data + m * place.stride0 + n * place.stride1;
    const T* add = kAdd ? addend + m * addend_stride0 + n * addend_stride1 : nullptr;
    const bool wide = count == 8 && 8 % kVec == 0 && !place.mapped() && place.stride1 == 1 &&
                      reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                      (!kAdd || (addend_stride1 == 1 &&
                                 reinterpret_cast<uintptr_t>(add) % 16 == 0));
    if (!wide) {
      for (int e = 0; e < count; ++e) (*this)(m, n + e, Acc(v[e]));
      return;
    }
    const Acc scale = alpha != nullptr ? *alpha : Acc(1);
    for (int part = 0; part < 8; part += kVec) {
      alignas(16) T chunk[kVec];
      if constexpr (kAdd) copy16(chunk, add + part);
      for (int e = 0; e < kVec; ++e) {
        Acc w = value(m, n + part + e, Acc(v[part + e]), scale);
        if constexpr (kAdd) w += to_acc<Acc>(chunk[e]);
        chunk[e] = round_to<T>(w);
      }
      copy16(out + part, chunk);
    }
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
