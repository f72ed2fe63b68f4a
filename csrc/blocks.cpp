// CPS-LoRA's cluster blocks as one dense low-rank update, and its gradients back to the blocks.
//
// The factors are stored in partition order: src [n, r_max] holds item p (a row of the output
// for B, a column of the input for A, as lora_A.t()) in cluster c when
// offsets[c] <= p < offsets[c + 1], with rank slots 0..ranks[c]-1 in use. The dense form
// [n, R] (R = sum of ranks) puts item p back at index[p] and cluster c's ranks at its rank
// offset, zero elsewhere:
//   dense[index[p], rank_offset[c] + k] = src[p, k] * scale[c]      (k < ranks[c])
// On the CPU one loop writes each element (no ATen op but the allocation); elsewhere ATen
// composes it per cluster, the same values bit for bit.
#include "adapted_linear.h"

namespace soslora {
namespace {

std::vector<int64_t> rank_offsets_of(at::IntArrayRef ranks) {
  std::vector<int64_t> offsets{0};
  for (const int64_t r : ranks) offsets.push_back(offsets.back() + r);
  return offsets;
}

template <typename dst_t, typename src_t, typename acc_t>
void place_cpu(dst_t* dense, const src_t* src, int64_t src_s0, int64_t src_s1,
               const int64_t* index, at::IntArrayRef offsets, at::IntArrayRef ranks,
               const std::vector<int64_t>& rank_offsets, const acc_t* scale, int64_t R) {
  for (size_t c = 0; c + 1 < offsets.size(); ++c) {
    const acc_t s = scale ? scale[c] : acc_t(1);
    parallel_rows(offsets[c + 1] - offsets[c], ranks[c], [&](int64_t first, int64_t last) {
      for (int64_t p = offsets[c] + first; p < offsets[c] + last; ++p) {
        dst_t* row = dense + index[p] * R + rank_offsets[c];
        const src_t* from = src + p * src_s0;
        for (int64_t k = 0; k < ranks[c]; ++k)
          row[k] = static_cast<dst_t>(static_cast<acc_t>(from[k * src_s1]) * s);
      }
    });
  }
}

// out[p, k] (or out[k, p] when `transposed`) for out [n, r_max].
template <typename dst_t, typename src_t, typename acc_t>
void gather_cpu(dst_t* out, int64_t n, int64_t r_max, bool transposed, const src_t* dense,
                int64_t dense_s0, int64_t dense_s1, const int64_t* index,
                at::IntArrayRef offsets, at::IntArrayRef ranks,
                const std::vector<int64_t>& rank_offsets, const acc_t* scale) {
  const int64_t step_p = transposed ? 1 : r_max, step_k = transposed ? n : 1;
  for (size_t c = 0; c + 1 < offsets.size(); ++c) {
    const acc_t s = scale ? scale[c] : acc_t(1);
    parallel_rows(offsets[c + 1] - offsets[c], r_max, [&](int64_t first, int64_t last) {
      for (int64_t p = offsets[c] + first; p < offsets[c] + last; ++p) {
        const src_t* row = dense + index[p] * dense_s0 + rank_offsets[c] * dense_s1;
        dst_t* to = out + p * step_p;
        int64_t k = 0;
        for (; k < ranks[c]; ++k)
          to[k * step_k] = static_cast<dst_t>(static_cast<acc_t>(row[k * dense_s1]) * s);
        for (; k < r_max; ++k) to[k * step_k] = dst_t(0);  // unused rank slots: zero gradient
      }
    });
  }
}

bool use_cpu_loop(const Tensor& a, const Tensor& index, const OptTensor& scale) {
  return a.is_cpu() && index.is_cpu() && (!scale.has_value() || scale->is_cpu()) &&
         !cpu_takes_cuda_fallback();
}

// t * scale[c] in t's accumulation dtype, as the loops multiply (ATen forms).
Tensor scaled(const Tensor& t, const OptTensor& scale, size_t c) {
  if (!scale.has_value()) return t;
  const auto acc = accumulate_dtype(t.scalar_type());
  return cast(t, acc) * cast(scale->select(0, static_cast<int64_t>(c)), acc);
}

}  // namespace

Tensor place_blocks(const Tensor& src, const Tensor& index, at::IntArrayRef offsets,
                    at::IntArrayRef ranks, const OptTensor& scale, at::ScalarType dtype,
                    bool differentiable) {
  const auto rank_offsets = rank_offsets_of(ranks);
  const int64_t n = src.size(0), R = rank_offsets.back();
  if (differentiable || !use_cpu_loop(src, index, scale)) {
    Tensor dense = at::zeros({n, R}, src.options().dtype(dtype));
    for (size_t c = 0; c < ranks.size(); ++c) {
      const int64_t len = offsets[c + 1] - offsets[c];
      if (len == 0 || ranks[c] == 0) continue;
      dense.narrow(1, rank_offsets[c], ranks[c])
          .index_copy_(0, index.narrow(0, offsets[c], len),
                       cast(scaled(src.narrow(0, offsets[c], len).narrow(1, 0, ranks[c]), scale, c),
                            dtype));
    }
    return dense;
  }
  Tensor dense = at::zeros({n, R}, src.options().dtype(dtype));
  const Tensor idx = index.contiguous();
  const auto acc = accumulate_dtype(src.scalar_type());
  const Tensor s = scale.has_value() ? scale->to(acc).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "place_blocks", [&] {
    using dst_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "place", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      place_cpu<dst_t, scalar_t, acc_t>(dense.data_ptr<dst_t>(), src.const_data_ptr<scalar_t>(),
                                        src.stride(0), src.stride(1), idx.const_data_ptr<int64_t>(),
                                        offsets, ranks, rank_offsets,
                                        s.defined() ? s.const_data_ptr<acc_t>() : nullptr, R);
    });
  });
  return dense;
}

Tensor gather_blocks(const Tensor& dense, const Tensor& index, at::IntArrayRef offsets,
                     at::IntArrayRef ranks, int64_t r_max, const OptTensor& scale,
                     at::ScalarType dtype, bool transposed) {
  const auto rank_offsets = rank_offsets_of(ranks);
  const int64_t n = dense.size(0);
  if (!use_cpu_loop(dense, index, scale)) {
    Tensor out = at::zeros({n, r_max}, dense.options().dtype(dtype));
    for (size_t c = 0; c < ranks.size(); ++c) {
      const int64_t len = offsets[c + 1] - offsets[c];
      if (len == 0 || ranks[c] == 0) continue;
      const Tensor rows = index.narrow(0, offsets[c], len);
      out.narrow(0, offsets[c], len).narrow(1, 0, ranks[c]).copy_(
          scaled(dense.narrow(1, rank_offsets[c], ranks[c]).index_select(0, rows), scale, c));
    }
    return transposed ? out.t().contiguous() : out;
  }
  Tensor out = transposed ? at::empty({r_max, n}, dense.options().dtype(dtype))
                          : at::empty({n, r_max}, dense.options().dtype(dtype));
  const Tensor& d = dense;
  const Tensor idx = index.contiguous();
  const auto acc = accumulate_dtype(dense.scalar_type());
  const Tensor s = scale.has_value() ? scale->to(acc).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gather_blocks", [&] {
    using dst_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "gather", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gather_cpu<dst_t, scalar_t, acc_t>(
          out.data_ptr<dst_t>(), n, r_max, transposed, d.const_data_ptr<scalar_t>(), d.stride(0),
          d.stride(1), idx.const_data_ptr<int64_t>(), offsets, ranks, rank_offsets,
          s.defined() ? s.const_data_ptr<acc_t>() : nullptr);
    });
  });
  return out;
}

}  // namespace soslora
