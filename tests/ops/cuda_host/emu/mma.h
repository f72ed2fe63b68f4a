// Shim for CUDA's <mma.h>: nvcuda::wmma 16x16x16 with __half / __nv_bfloat16 inputs and float
// accumulators. The fragment layout across lanes is unspecified, so valid wmma code cannot
// tell whether a lane holds a part of the tile or, as here, all of it: every lane holds the
// whole 16x16 tile. Each operation is warp-collective: the lanes of a warp must issue the same
// operations with the same pointers, ldm and fragment contents (checked, see cuda_emu.h). The
// first lane computes mma_sync (float products of the inputs, summed in float in k order onto
// the accumulator) and the others take its result; loads are done by every lane and compared.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <type_traits>

namespace soslora_emu {
const void* collective_begin(const char* what, const std::source_location& where,
                             const void* key, size_t key_bytes);
void collective_publish(const void* result, size_t bytes);
void collective_check(const void* first, const void* mine, size_t bytes, const char* what,
                      const std::source_location& where);
[[noreturn]] void fatal_at(const std::source_location& where, const std::string& message);
}  // namespace soslora_emu

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the shim emulates 16x16x16 only");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : (std::is_same_v<T, __half> ||
                                                    std::is_same_v<T, __nv_bfloat16>),
                "the shim emulates half/bf16 inputs with float accumulators");
  static constexpr int num_elements = 256;  // the whole tile, row-major [16][16]
  T x[num_elements];
  fragment() { std::memset(static_cast<void*>(x), 0xFF, sizeof(x)); }  // NaN until loaded or filled
};

namespace detail {

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
void check_pointer(const T* p, unsigned ldm, const char* what, const std::source_location& at) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    soslora_emu::fatal_at(at, std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    soslora_emu::fatal_at(at, std::string(what) + ": ldm = " + std::to_string(ldm) +
                                  " elements is not a multiple of 16 bytes");
}

template <class Frag, class T>
void load(Frag& f, const T* p, unsigned ldm, bool row_major, const std::source_location& at) {
  check_pointer(p, ldm, "wmma::load_matrix_sync", at);
  const uint64_t key[3] = {reinterpret_cast<uintptr_t>(p), ldm, row_major};  // no padding bytes
  const void* first = soslora_emu::collective_begin("load_matrix_sync", at, &key, sizeof(key));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = row_major ? p[r * ldm + c] : p[c * ldm + r];
  if (first == nullptr) soslora_emu::collective_publish(f.x, sizeof(f.x));
  else soslora_emu::collective_check(first, f.x, sizeof(f.x), "load_matrix_sync", at);
}

}  // namespace detail

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm,
                      std::source_location at = std::source_location::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::load(f, p, ldm, std::is_same_v<Layout, row_major>, at);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout,
                             std::source_location at = std::source_location::current()) {
  detail::load(f, p, ldm, layout == mem_row_major, at);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout,
                              std::source_location at = std::source_location::current()) {
  detail::check_pointer(p, ldm, "wmma::store_matrix_sync", at);
  struct { uint64_t p, ldm, layout; float x[256]; } key{reinterpret_cast<uintptr_t>(p), ldm,
                                                        uint64_t(layout), {}};
  std::memcpy(key.x, f.x, sizeof(key.x));
  soslora_emu::collective_begin("store_matrix_sync", at, &key, sizeof(key));
  for (int r = 0; r < 16; ++r)  // every lane stores the same values: the result is the same
    for (int c = 0; c < 16; ++c)
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
}

template <class Use, class T, class Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& value,
                   std::source_location at = std::source_location::current()) {
  const T key = value;
  soslora_emu::collective_begin("fill_fragment", at, &key, sizeof(key));
  for (T& v : f.x) v = value;
}

template <class T, class LayoutA, class LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c,
              std::source_location at = std::source_location::current()) {
  struct { T a[256], b[256]; float c[256]; } key;
  std::memcpy(key.a, a.x, sizeof(key.a));
  std::memcpy(key.b, b.x, sizeof(key.b));
  std::memcpy(key.c, c.x, sizeof(key.c));
  const void* first = soslora_emu::collective_begin("mma_sync", at, &key, sizeof(key));
  if (first != nullptr) {
    std::memcpy(d.x, first, sizeof(d.x));
    return;
  }
  float fa[256], fb[256];
  for (int i = 0; i < 256; ++i) fa[i] = detail::to_float(key.a[i]), fb[i] = detail::to_float(key.b[i]);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = key.c[i * 16 + j];
      for (int k = 0; k < 16; ++k) sum += fa[i * 16 + k] * fb[k * 16 + j];
      d.x[i * 16 + j] = sum;
    }
  soslora_emu::collective_publish(d.x, sizeof(d.x));
}

}  // namespace nvcuda::wmma
