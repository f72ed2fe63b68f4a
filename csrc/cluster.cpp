// Cluster-local low-rank terms (CPS-LoRA), forward and backward; see soslora.h for the layout.
//
// The checks, then one of three forms: the CPU loops (cluster_cpu.cpp), the grouped CUDA kernels
// (cluster_kernels.cu) where "auto" finds them faster, or the gather/scatter form in ATen calls.
#include "dispatch.h"
#include "soslora.h"

namespace soslora {
namespace {

constexpr const char* kForward = "soslora::cluster_lowrank_forward";
constexpr const char* kBackward = "soslora::cluster_lowrank_backward";

void check_offsets(at::IntArrayRef offsets, const char* name, int64_t clusters, int64_t total,
                   const char* op) {
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == clusters + 1, op, ": ", name,
              " must have num_clusters + 1 = ", clusters + 1, " entries, got ", offsets.size());
  TORCH_CHECK(offsets.front() == 0 && offsets.back() == total, op, ": ", name,
              " must start at 0 and end at ", total, ", got ", offsets);
  for (size_t c = 1; c < offsets.size(); ++c)
    TORCH_CHECK(offsets[c - 1] <= offsets[c], op, ": ", name, " must be non-decreasing, got ",
                offsets);
}

void check_index(const Tensor& index, const char* name, int64_t size, const Tensor& like,
                 const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == size, op,
              ": ", name, " must be an int64 permutation of shape [", size, "], got ",
              index.scalar_type(), " of shape ", index.sizes());
  TORCH_CHECK(index.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", index.device());
}

// An index must be a permutation: the CPU loops write through it (checked where it lives on
// the CPU, without a device sync; on a GPU the ATen index ops check their bounds).
void check_permutation(const Tensor& index, const char* name, const char* op) {
  if (!index.is_cpu()) return;
  const Tensor idx = index.contiguous();
  const int64_t n = idx.numel();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  std::vector<bool> seen(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < n && !seen[p[i]], op, ": ", name,
                " must be a permutation of 0..", n - 1, ", got ", p[i], " at position ", i,
                p[i] >= 0 && p[i] < n ? " (repeated)" : " (out of range)");
    seen[p[i]] = true;
  }
}

}  // namespace

std::vector<int64_t> check_cluster_layout(const Tensor& x, const Tensor& A, const Tensor& B,
                                          const Tensor& scale, const Tensor& row_index,
                                          const Tensor& col_index, at::IntArrayRef row_offsets,
                                          at::IntArrayRef col_offsets, at::IntArrayRef ranks,
                                          const char* op) {
  const auto clusters = static_cast<int64_t>(ranks.size());
  TORCH_CHECK(clusters >= 1, op, ": ranks must name at least one cluster");
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()) && scale.dim() == 1 &&
                  scale.size(0) == clusters && scale.device() == A.device(),
              op, ": scale must be a floating-point tensor [num_clusters] = [", clusters,
              "] on ", A.device(), ", got ", scale.scalar_type(), " ", scale.sizes(), " on ",
              scale.device());
  check_index(row_index, "row_index", B.size(0), x, op);
  check_index(col_index, "col_index", x.size(1), x, op);
  check_permutation(row_index, "row_index", op);
  check_permutation(col_index, "col_index", op);
  check_offsets(row_offsets, "row_offsets", clusters, B.size(0), op);
  check_offsets(col_offsets, "col_offsets", clusters, x.size(1), op);
  std::vector<int64_t> rank_offsets{0};
  for (const int64_t r : ranks) {
    TORCH_CHECK(r >= 0 && r <= A.size(0), op, ": every rank must be in [0, r_max = ", A.size(0),
                "], got ", ranks);
    rank_offsets.push_back(rank_offsets.back() + r);
  }
  return rank_offsets;
}

namespace {

// Checks the factors (one dtype with x) and the partition; returns the rank offsets of the
// hidden columns.
std::vector<int64_t> check_partition(const Tensor& x, const Tensor& A, const Tensor& B,
                                     const Tensor& scale, const Tensor& row_index,
                                     const Tensor& col_index, at::IntArrayRef row_offsets,
                                     at::IntArrayRef col_offsets, at::IntArrayRef ranks,
                                     const char* op) {
  check_matrix(x, "x", op);
  check_matrix(A, "A", op);
  check_matrix(B, "B", op);
  check_same_float_dtype(x, "x", A, "A", op);
  check_same_float_dtype(x, "x", B, "B", op);
  TORCH_CHECK(A.size(1) == x.size(1), op, ": A must be [r_max, in] with in = x.size(1) = ",
              x.size(1), ", got A of shape ", A.sizes());
  TORCH_CHECK(B.size(1) == A.size(0), op, ": B must be [out, r_max] with r_max = A.size(0) = ",
              A.size(0), ", got B of shape ", B.sizes());
  return check_cluster_layout(x, A, B, scale, row_index, col_index, row_offsets, col_offsets,
                              ranks, op);
}

// Cluster c's blocks of A [r_c, |C_c|] and of B * scale[c] [|R_c|, r_c].
Tensor block_A(const Tensor& A, at::IntArrayRef col_offsets, at::IntArrayRef ranks, size_t c) {
  return A.narrow(0, 0, ranks[c]).narrow(1, col_offsets[c], col_offsets[c + 1] - col_offsets[c]);
}
Tensor block_Bs(const Tensor& B, const Tensor& scale_acc, at::IntArrayRef row_offsets,
                at::IntArrayRef ranks, size_t c) {
  const Tensor Bc =
      B.narrow(0, row_offsets[c], row_offsets[c + 1] - row_offsets[c]).narrow(1, 0, ranks[c]);
  return (Bc.to(scale_acc.scalar_type()) * scale_acc[c]).to(B.scalar_type());
}

// Whether `index` is 0, 1, ..., n - 1: a partition in index order (the contiguous initial
// one, and any static partition of it), whose gathers and scatters are plain copies that can
// be skipped. Asked on the CPU only, where it costs one pass over the index and no sync.
bool is_identity(const Tensor& index) {
  if (!index.is_cpu()) return false;
  const Tensor idx = index.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    if (p[i] != i) return false;
  return true;
}

// t's columns in partition order: t[:, index].
Tensor gather_columns(const Tensor& t, const Tensor& index, bool identity) {
  return identity ? t : t.index_select(1, index);
}

// start + parts scattered back to their columns: start[:, index[j]] += parts[:, j].
Tensor scatter_add_columns(const Tensor& start, const Tensor& index, const Tensor& parts,
                           bool identity) {
  return identity ? start.add(parts) : at::index_add(start, 1, index, parts);
}

// The gather/scatter form in ATen calls (devices without the CPU loops or the CUDA kernels):
// the input gathered once into partition order (x[:, col_index]) so that every cluster's
// columns are one contiguous range, each cluster two small matmuls on views, the output
// scattered back with one index_add; a partition in index order skips both.
std::tuple<Tensor, Tensor> forward_aten(
    const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, const OptTensor& base_out,
    const OptTensor& dropout_seed, double dropout_p) {
  const bool cols_in_order = is_identity(col_index), rows_in_order = is_identity(row_index);
  const Tensor x_perm =
      gather_columns(dropout_apply(x, dropout_seed, dropout_p), col_index, cols_in_order);
  const Tensor scale_acc = scale.to(accumulate_dtype(B.scalar_type()));
  // Per-cluster products go to fresh tensors and are concatenated: matmuls into strided
  // views of one buffer take a slow path in ATen.
  std::vector<Tensor> hidden_parts, out_parts;
  for (size_t c = 0; c < ranks.size(); ++c) {
    const Tensor h = at::mm(x_perm.narrow(1, col_offsets[c], col_offsets[c + 1] - col_offsets[c]),
                            block_A(A, col_offsets, ranks, c).t());
    out_parts.push_back(at::mm(h, block_Bs(B, scale_acc, row_offsets, ranks, c).t()));
    hidden_parts.push_back(h);
  }
  const Tensor hidden = at::cat(hidden_parts, 1);
  const Tensor out_perm = at::cat(out_parts, 1);  // adapter output in partition order
  if (base_out.has_value())
    return {scatter_add_columns(*base_out, row_index, out_perm, rows_in_order), hidden};
  if (rows_in_order) return {out_perm, hidden};
  return {at::index_add(at::zeros_like(out_perm), 1, row_index, out_perm), hidden};
}

std::tuple<Tensor, Tensor, Tensor> backward_aten(
    const Tensor& grad_out, const Tensor& x, const Tensor& A, const Tensor& B,
    const Tensor& scale, const Tensor& hidden, const OptTensor& grad_hidden,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, const std::vector<int64_t>& rank_offsets,
    const OptTensor& grad_x_base, const OptTensor& dropout_seed, double dropout_p) {
  const bool cols_in_order = is_identity(col_index), rows_in_order = is_identity(row_index);
  const Tensor x_perm =
      gather_columns(dropout_apply(x, dropout_seed, dropout_p), col_index, cols_in_order);
  const Tensor grad_perm = gather_columns(grad_out, row_index, rows_in_order);
  const Tensor scale_acc = scale.to(accumulate_dtype(B.scalar_type()));
  // Rank slots beyond a cluster's rank (and clusters' unused blocks) get zero gradient.
  Tensor grad_A = at::zeros_like(A);
  Tensor grad_B = at::zeros_like(B);
  std::vector<Tensor> grad_x_parts;
  for (size_t c = 0; c < ranks.size(); ++c) {
    const int64_t rows = row_offsets[c + 1] - row_offsets[c];
    const int64_t cols = col_offsets[c + 1] - col_offsets[c];
    const Tensor g = grad_perm.narrow(1, row_offsets[c], rows);
    const Tensor h = hidden.narrow(1, rank_offsets[c], ranks[c]);
    // grad_B = scale * g^T h, rounded once from the accumulation dtype.
    grad_B.narrow(0, row_offsets[c], rows).narrow(1, 0, ranks[c]).copy_(
        at::mm(g.t(), h).to(scale_acc.scalar_type()) * scale_acc[c]);
    Tensor grad_h = at::mm(g, block_Bs(B, scale_acc, row_offsets, ranks, c));
    if (grad_hidden.has_value()) grad_h.add_(grad_hidden->narrow(1, rank_offsets[c], ranks[c]));
    const Tensor x_c = x_perm.narrow(1, col_offsets[c], cols);
    grad_A.narrow(0, 0, ranks[c]).narrow(1, col_offsets[c], cols).copy_(at::mm(grad_h.t(), x_c));
    grad_x_parts.push_back(at::mm(grad_h, block_A(A, col_offsets, ranks, c)));
  }
  const Tensor grad_x_parts_cat = at::cat(grad_x_parts, 1);
  const Tensor grad_x_drop =
      cols_in_order ? grad_x_parts_cat
                    : at::zeros_like(x).index_add_(1, col_index, grad_x_parts_cat);
  Tensor grad_x = dropout_apply(grad_x_drop, dropout_seed, dropout_p);
  if (grad_x_base.has_value()) grad_x.add_(*grad_x_base);
  return {grad_x, grad_A, grad_B};
}

}  // namespace

std::tuple<Tensor, Tensor> cluster_lowrank_forward(
    const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, const OptTensor& base_out,
    const OptTensor& dropout_seed, double dropout_p) {
  const auto rank_offsets = check_partition(x, A, B, scale, row_index, col_index, row_offsets,
                                            col_offsets, ranks, kForward);
  if (base_out.has_value()) {
    check_same_float_dtype(*base_out, "base_out", x, "x", kForward);
    TORCH_CHECK(base_out->dim() == 2 && base_out->size(0) == x.size(0) &&
                    base_out->size(1) == B.size(0),
                kForward, ": base_out must be [N, out] = [", x.size(0), ", ", B.size(0),
                "], got ", base_out->sizes());
  }
  check_dropout(dropout_seed, dropout_p, x, kForward);
  if (x.is_cpu() && !cpu_takes_cuda_fallback())
    return cluster_lowrank_forward_cpu(x, A, B, scale, row_index, col_index, row_offsets,
                                       col_offsets, ranks, rank_offsets, base_out, dropout_seed,
                                       dropout_p);
  const auto aten = [&] {
    return forward_aten(x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks,
                        base_out, dropout_seed, dropout_p);
  };
#ifdef SOSLORA_WITH_CUDA
  return dispatch(
      "cluster_forward", x,
      {x.size(0), x.size(1), B.size(0), rank_offsets.back(), static_cast<int64_t>(ranks.size()),
       dropout_p > 0, base_out.has_value()},
      [&] {
        return cluster_lowrank_forward_cuda(x, A, B, scale, row_index, col_index, row_offsets,
                                            col_offsets, rank_offsets, base_out, dropout_seed,
                                            dropout_p);
      },
      aten);
#else
  return aten();
#endif
}

std::tuple<Tensor, Tensor, Tensor> cluster_lowrank_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& A, const Tensor& B,
    const Tensor& scale, const Tensor& hidden, const OptTensor& grad_hidden,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, const OptTensor& grad_x_base,
    const OptTensor& dropout_seed, double dropout_p) {
  const auto rank_offsets = check_partition(x, A, B, scale, row_index, col_index, row_offsets,
                                            col_offsets, ranks, kBackward);
  check_matrix(grad_out, "grad_out", kBackward);
  check_same_float_dtype(grad_out, "grad_out", x, "x", kBackward);
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == B.size(0), kBackward,
              ": grad_out must be [N, out] = [", x.size(0), ", ", B.size(0), "], got ",
              grad_out.sizes());
  check_same_float_dtype(hidden, "hidden", x, "x", kBackward);
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == x.size(0) &&
                  hidden.size(1) == rank_offsets.back(),
              kBackward, ": hidden must be [N, sum(ranks)] = [", x.size(0), ", ",
              rank_offsets.back(), "], got ", hidden.sizes());
  if (grad_hidden.has_value()) {
    check_same_float_dtype(*grad_hidden, "grad_hidden", x, "x", kBackward);
    TORCH_CHECK(grad_hidden->sizes() == hidden.sizes(), kBackward,
                ": grad_hidden must have hidden's shape ", hidden.sizes(), ", got ",
                grad_hidden->sizes());
  }
  check_dropout(dropout_seed, dropout_p, x, kBackward);
  if (grad_x_base.has_value()) {
    check_same_float_dtype(*grad_x_base, "grad_x_base", x, "x", kBackward);
    TORCH_CHECK(grad_x_base->sizes() == x.sizes(), kBackward, ": grad_x_base must be [N, in] = ",
                x.sizes(), ", got ", grad_x_base->sizes());
  }
  if (x.is_cpu() && !cpu_takes_cuda_fallback())
    return cluster_lowrank_backward_cpu(grad_out, x, A, B, scale, hidden, grad_hidden,
                                        row_index, col_index, row_offsets, col_offsets, ranks,
                                        rank_offsets, grad_x_base, dropout_seed, dropout_p);
  const auto aten = [&] {
    return backward_aten(grad_out, x, A, B, scale, hidden, grad_hidden, row_index, col_index,
                         row_offsets, col_offsets, ranks, rank_offsets, grad_x_base,
                         dropout_seed, dropout_p);
  };
#ifdef SOSLORA_WITH_CUDA
  return dispatch(
      "cluster_backward", x,
      {x.size(0), x.size(1), B.size(0), rank_offsets.back(), static_cast<int64_t>(ranks.size()),
       dropout_p > 0, grad_hidden.has_value(), grad_x_base.has_value()},
      [&] {
        return cluster_lowrank_backward_cuda(grad_out, x, A, B, scale, hidden, grad_hidden,
                                             row_index, col_index, row_offsets, col_offsets,
                                             rank_offsets, grad_x_base, dropout_seed, dropout_p);
      },
      aten);
#else
  return aten();
#endif
}

}  // namespace soslora
