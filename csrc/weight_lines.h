// The CPU sweeps over the lines of a weight (its rows, or the columns of a transposed weight)
// that merge_into_ and weight_stats share: a band's update added and rounded, max|w| and the
// fingerprint, all in one pass over the values (merge.cpp). No torch headers beyond the
// element types; each function is inlined into a caller compiled for one instruction set.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__GNUC__)
#define SOSLORA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SOSLORA_ALWAYS_INLINE inline
#endif

namespace soslora::lines {

// The fingerprint's words are summed mod 2^64 for 8-byte values, mod 2^32 otherwise.
template <typename T> using Word = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
// The raw bits of a value.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t,
                                std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

template <typename T> SOSLORA_ALWAYS_INLINE Bits<T> bits_of(T v) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) return v.x;
  else return std::bit_cast<Bits<T>>(v);
}
// |v|'s bits: for IEEE formats they order as |v| does (NaN above +inf).
template <typename T> constexpr Bits<T> kMagnitude = Bits<T>(~(Bits<T>(1) << (8 * sizeof(T) - 1)));
// The bits of +inf: magnitudes at or above it are not finite.
template <typename T> constexpr Bits<T> kInfBits =
    sizeof(T) == 8 ? Bits<T>(0x7FF0000000000000ull)
    : sizeof(T) == 4 ? Bits<T>(0x7F800000u)
    : std::is_same_v<T, c10::Half> ? Bits<T>(0x7C00u) : Bits<T>(0x7F80u);



// The 16-bit conversions without branches, so that the sweeps vectorize: bit for bit those of
// c10 (and F16C's), NaN's payload aside (FP16's reference algorithm; no flush of subnormals).
SOSLORA_ALWAYS_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) *
                       std::bit_cast<float>(15u << 23);
  const float subnormal = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  return std::bit_cast<float>(sign | (two_w < (1u << 27) ? std::bit_cast<uint32_t>(subnormal)
                                                         : std::bit_cast<uint32_t>(normal)));
}
SOSLORA_ALWAYS_INLINE uint16_t float_to_half(float f) {
  const uint32_t w = std::bit_cast<uint32_t>(f), shl1_w = w + w, sign = w & 0x80000000u;
  float base = (std::abs(f) * std::bit_cast<float>(239u << 23)) * std::bit_cast<float>(17u << 23);
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = std::bit_cast<float>((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = std::bit_cast<uint32_t>(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
SOSLORA_ALWAYS_INLINE float bfloat16_to_float(uint16_t b) {
  return std::bit_cast<float>(uint32_t(b) << 16);
}
SOSLORA_ALWAYS_INLINE uint16_t float_to_bfloat16(float f) {  // round to nearest even
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? uint16_t(0x7FC0) : rounded;
}

// Values are loaded and stored as their bits (memcpy: the 16-bit classes would not vectorize).
template <typename T> SOSLORA_ALWAYS_INLINE Bits<T> load_bits(const T* p) {
  Bits<T> b;
  std::memcpy(&b, p, sizeof(T));
  return b;
}
template <typename T> SOSLORA_ALWAYS_INLINE void store_bits(T* p, Bits<T> b) {
  std::memcpy(p, &b, sizeof(T));
}

// The value of bits b of T in the accumulation type.
template <typename Acc, typename T> SOSLORA_ALWAYS_INLINE Acc widen(Bits<T> b) {
  if constexpr (std::is_same_v<T, c10::Half>) return static_cast<Acc>(half_to_float(b));
  else if constexpr (std::is_same_v<T, c10::BFloat16>)
    return static_cast<Acc>(bfloat16_to_float(b));
  else return static_cast<Acc>(std::bit_cast<T>(b));
}
// T's largest finite value in the accumulation type.
template <typename T, typename Acc> SOSLORA_ALWAYS_INLINE Acc max_value() {
  return widen<Acc, T>(bits_of(std::numeric_limits<T>::max()));
}
// The bits of v rounded to T as torch's conversions round (a double rounded to float first
// for 16-bit T).
template <typename T, typename Acc> SOSLORA_ALWAYS_INLINE Bits<T> narrow(Acc v) {
  if constexpr (std::is_same_v<T, c10::Half>) return float_to_half(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, c10::BFloat16>)
    return float_to_bfloat16(static_cast<float>(v));
  else return std::bit_cast<Bits<T>>(static_cast<T>(v));
}

// What a sweep gathers: the fingerprint sums (see soslora.h, weight_stats), the largest
// magnitude's bits, and a count (weight_stats: values that are not finite; merge: sums beyond
// the dtype's finite range).
template <typename T> struct Tally {
  Word<T> row_sum = 0, col_sum = 0;
  Bits<T> max_bits = 0;
  int64_t count = 0;
  void add(const Tally& o) {
    row_sum += o.row_sum, col_sum += o.col_sum, count += o.count;
    max_bits = std::max(max_bits, o.max_bits);
  }
};

// How a weight [rows, cols] is swept: `count` lines of `length` values, line l starting at
// l * line_stride, value k of it at k * step. Lines are the rows (`rows`) or the columns.
// `pairs`: 16-bit values with an even number of columns, whose words are two adjacent values
// of a row (sharing.fingerprint's rule).
struct Geometry {
  bool rows, pairs;
  int64_t count, length, line_stride, step;
};

// The weight of position p in the fingerprint's sums: 2p + 1 (wrapping).
template <typename W> SOSLORA_ALWAYS_INLINE W odd(int64_t p) { return W(2) * W(p) + W(1); }

// The weight of line l's index (a column of pairs: the word's index l / 2).
template <typename W> SOSLORA_ALWAYS_INLINE W line_weight(const Geometry& g, int64_t line) {
  return !g.rows && g.pairs ? odd<W>(line >> 1) : odd<W>(line);
}

// Adds sums into `tally`: `by_line`, the words weighted by their line's index; `by_position`,
// weighted by their position along the line. Rows' indices weight the first sum.
template <typename T>
SOSLORA_ALWAYS_INLINE void add_sums(const Geometry& g, Word<T> by_line, Word<T> by_position,
                                    Tally<T>& t) {
  (g.rows ? t.row_sum : t.col_sum) += by_line;
  (g.rows ? t.col_sum : t.row_sum) += by_position;
}

// How a value enters the fingerprint's words: 16-bit values of a row of pairs are the low or
// high half of word k / 2 (kRowPairs); in a column of pairs the line's parity gives the half
// (kColumnPairs); other 16-bit values count sign-extended (as int16 summed into int32), wider
// ones as they are (kSingle).
enum class Words { kSingle, kRowPairs, kColumnPairs };

template <typename T> Words words_of(const Geometry& g) {
  if (sizeof(T) != 2 || !g.pairs) return Words::kSingle;
  return g.rows ? Words::kRowPairs : Words::kColumnPairs;
}

// The word value k of line `line` adds, and the weight of its position along the line.
template <typename T, Words kWords> struct WordOf {
  using W = Word<T>;
  unsigned shift;
  SOSLORA_ALWAYS_INLINE explicit WordOf(int64_t line) : shift(16u * unsigned(line & 1)) {}
  SOSLORA_ALWAYS_INLINE W operator()(Bits<T> b, W k) const {
    if constexpr (kWords == Words::kRowPairs) return W(b) << ((k & 1) * 16);
    else if constexpr (kWords == Words::kColumnPairs) return W(b) << shift;
    else if constexpr (sizeof(T) == 2) return W(uint32_t(int32_t(int16_t(b))));
    else return W(b);
  }
  static SOSLORA_ALWAYS_INLINE W weight(W k) {
    if constexpr (kWords == Words::kRowPairs) return (k >> 1) * 2 + 1;
    else return 2 * k + 1;
  }
};

// Sums of one line's values (read only): the fingerprint, max magnitude, non-finite count.
template <typename T, Words kWords>
SOSLORA_ALWAYS_INLINE void read_line(const Geometry& g, int64_t line, const T* __restrict w,
                                     Tally<T>& t) {
  using W = Word<T>;
  using B = Bits<T>;
  const WordOf<T, kWords> word(line);
  W s = 0, p = 0, bad = 0, k = 0;
  B m = t.max_bits;
  const int64_t n = g.length, step = g.step;
  for (int64_t i = 0; i < n; ++i, ++k) {
    const B b = load_bits(w + i * step);
    const B a = b & kMagnitude<T>;
    m = std::max(m, a);
    bad += a >= kInfBits<T>;
    const W v = word(b, k);
    s += v;
    p += word.weight(k) * v;
  }
  t.max_bits = m;
  t.count += int64_t(bad);
  add_sums(g, line_weight<W>(g, line) * s, p, t);
}

// w := round(w + alpha d) for the n values of line `line` from position `first` (w and d
// point to the first of them), d in the accumulation type; d is overwritten with the old
// values (so a refused tile can be put back exactly) and the written values are tallied.
// Returns the number of sums beyond T's finite range (the values are written anyway: the
// caller puts them back when there are any).
template <typename T, typename Acc, Words kWords>
SOSLORA_ALWAYS_INLINE int64_t add_segment(const Geometry& g, int64_t line, int64_t first,
                                          int64_t n, T* __restrict w, Acc* __restrict d,
                                          Acc alpha, Tally<T>& t) {
  using W = Word<T>;
  using B = Bits<T>;
  const Acc limit = max_value<T, Acc>();
  const WordOf<T, kWords> word(line);
  W s = 0, p = 0, bad = 0, k = W(first);
  B m = t.max_bits;
  const int64_t step = g.step;
  for (int64_t i = 0; i < n; ++i, ++k) {
    const Acc old = widen<Acc, T>(load_bits(w + i * step));
    const Acc sum = old + alpha * d[i];
    bad += !(std::abs(sum) <= limit);
    const B b = narrow<T>(sum);
    d[i] = old;
    store_bits(w + i * step, b);
    m = std::max<B>(m, b & kMagnitude<T>);
    const W v = word(b, k);
    s += v;
    p += word.weight(k) * v;
  }
  t.max_bits = m;
  add_sums(g, line_weight<W>(g, line) * s, p, t);
  return int64_t(bad);
}

// Puts n values back from the old values add_segment left in d.
template <typename T, typename Acc>
SOSLORA_ALWAYS_INLINE void restore_segment(const Geometry& g, int64_t n, T* w, const Acc* d) {
  for (int64_t k = 0; k < n; ++k) store_bits(w + k * g.step, narrow<T>(d[k]));
}

// w := round(w + alpha d) for n values, kept within T's finite range: takes back an update
// written before (one more rounding, as an unmerge), where a sum at the edge of the range
// could round past it.
template <typename T, typename Acc>
SOSLORA_ALWAYS_INLINE void subtract_segment(const Geometry& g, int64_t n, T* w, const Acc* d,
                                            Acc alpha) {
  const Acc limit = max_value<T, Acc>();
  for (int64_t k = 0; k < n; ++k) {
    const Acc sum = widen<Acc, T>(load_bits(w + k * g.step)) + alpha * d[k];
    store_bits(w + k * g.step, narrow<T>(std::clamp(sum, -limit, limit)));
  }
}

}  // namespace soslora::lines
