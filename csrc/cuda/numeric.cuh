// Element conversions shared by the kernels: every kernel accumulates in Acc (float, or double
// for double data) and rounds once when it writes its element type.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace soslora::cuda {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T> __host__ __device__ __forceinline__ T from_double(double v) { return T(v); }
template <> __host__ __device__ __forceinline__ __half from_double<__half>(double v) {
  return __double2half(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
  return __double2bfloat16(v);
}

template <typename Acc, typename T> __device__ __forceinline__ Acc to_acc(T v) {
  return static_cast<Acc>(v);
}
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Rounds an accumulator value to T (float -> half/bf16 directly, round to nearest even).
template <typename T, typename Acc> __device__ __forceinline__ T round_to(Acc v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}

}  // namespace soslora::cuda
