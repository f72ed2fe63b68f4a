// CPS-LoRA's cluster form on the tile engine (see kernels.h): every cluster's product is one
// problem of a grouped launch, its operands read through the partition's index maps in place
// (x[:, C_c] and grad_out[:, R_c] are never gathered) and its results written through them
// (out[:, R_c] and grad_x[:, C_c] are never scattered), with the scale s_c applied in the
// epilogue and the input's dropout as x is read.
#include <vector>

#include "kernels.h"
#include "matrix_access.cuh"
#include "numeric.cuh"
#include "tile_product.cuh"

namespace soslora::cuda {
namespace {

// The [rows, cols] block of a plain matrix at (i, j).
template <typename T>
Matrix block(const Matrix& m, int64_t i, int64_t j, int64_t rows, int64_t cols) {
  Matrix b = m;
  b.data = static_cast<const T*>(m.data) + i * m.stride0 + j * m.stride1;
  b.rows = rows;
  b.cols = cols;
  return b;
}

// The transpose of a matrix without dropout (its maps swap with its dimensions).
Matrix transposed(const Matrix& m) {
  Matrix t = m;
  t.rows = m.cols;
  t.cols = m.rows;
  t.stride0 = m.stride1;
  t.stride1 = m.stride0;
  t.row_map = m.col_map;
  t.col_map = m.row_map;
  t.row_extent = m.col_extent;
  t.col_extent = m.row_extent;
  return t;
}

// m's columns map[0..cols) (of m's cols), in place.
Matrix columns(const Matrix& m, const int64_t* map, int64_t cols) {
  Matrix c = m;
  c.cols = cols;
  c.col_map = map;
  c.col_extent = m.cols;
  return c;
}

// Cluster c's sizes.
struct Cluster {
  int64_t rows, row0, cols, col0, rank, rank0;
};
Cluster cluster(const ClusterPartition& p, int64_t c) {
  return {p.row_offsets[c + 1] - p.row_offsets[c], p.row_offsets[c],
          p.col_offsets[c + 1] - p.col_offsets[c], p.col_offsets[c],
          p.rank_offsets[c + 1] - p.rank_offsets[c], p.rank_offsets[c]};
}

template <typename T> using Load = MatrixLoad<T, acc_t<T>>;
template <typename T, bool kAdd>
using WriteProblem = TileProblem<Load<T>, Load<T>, WriteEpilogue<T, acc_t<T>, kAdd>>;
template <typename T> using AtomicEpilogue = AtomicAddEpilogue<acc_t<T>>;
template <typename T> using AtomicProblem = TileProblem<Load<T>, Load<T>, AtomicEpilogue<T>>;

// One cluster's product: left (M x K) @ right (K x N).
struct Operands {
  int64_t M, N, K;
  Matrix left, right;
};

// For every cluster c, out_c = [base_c +] alpha_c operands(c) with alpha_c = scale[c] (no scale:
// 1); view(c, t) is cluster c's part of a tensor shaped like out (out_c = view(c, out), base_c =
// view(c, *base)). One grouped launch.
template <typename T, class MakeOperands, class View>
cudaError_t launch_writes(const ClusterPartition& p, const Matrix& out, const Matrix* base,
                          const acc_t<T>* scale, const MakeOperands& operands, const View& view,
                          cudaStream_t stream) {
  using Acc = acc_t<T>;
  std::vector<WriteProblem<T, false>> stores;
  std::vector<WriteProblem<T, true>> adds;
  for (int64_t c = 0; c < p.clusters; ++c) {
    const Cluster k = cluster(p, c);
    const Operands o = operands(k);
    const Acc* alpha = scale != nullptr ? scale + c : nullptr;
    if (base != nullptr) {
      const Matrix addend = view(k, *base);
      adds.push_back({o.M, o.N, o.K, loader<T, Acc>(o.left), loader<T, Acc>(o.right),
                      writer<T, Acc, true>(view(k, out), alpha, &addend)});
    } else {
      stores.push_back({o.M, o.N, o.K, loader<T, Acc>(o.left), loader<T, Acc>(o.right),
                        writer<T, Acc, false>(view(k, out), alpha)});
    }
  }
  if (base != nullptr) return launch_tile_products<T>(adds.data(), int64_t(adds.size()), 1, stream);
  return launch_tile_products<T>(stores.data(), int64_t(stores.size()), 1, stream);
}

template <typename T>
cudaError_t forward_typed(const ClusterPartition& p, const Matrix& x, const Matrix& A,
                          const Matrix& B, const Matrix& hidden, const Matrix& out,
                          const Matrix* base, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int64_t n = x.rows;
  const auto hidden_of = [&](const Cluster& k, const Matrix& t) {
    return block<T>(t, 0, k.rank0, n, k.rank);
  };
  // hidden_c = D(x)[:, C_c] A_cᵀ
  cudaError_t err = launch_writes<T>(
      p, hidden, nullptr, nullptr,
      [&](const Cluster& k) {
        return Operands{n, k.rank, k.cols, columns(x, p.col_index + k.col0, k.cols),
                        transposed(block<T>(A, 0, k.col0, k.rank, k.cols))};
      },
      hidden_of, stream);
  if (err != cudaSuccess) return err;
  // out[:, R_c] = base[:, R_c] + s_c hidden_c B_cᵀ
  return launch_writes<T>(
      p, out, base, static_cast<const Acc*>(p.scale),
      [&](const Cluster& k) {
        return Operands{n, k.rows, k.rank, hidden_of(k, hidden),
                        transposed(block<T>(B, k.row0, 0, k.rows, k.rank))};
      },
      [&](const Cluster& k, const Matrix& t) { return columns(t, p.row_index + k.row0, k.rows); },
      stream);
}

template <typename T>
cudaError_t backward_typed(const ClusterPartition& p, const Matrix& grad_out, const Matrix& x,
                           const Matrix& A, const Matrix& B, const Matrix& hidden,
                           const Matrix& grad_hidden, const Matrix* grad_hidden_in,
                           void* grad_A_acc, void* grad_B_acc, const Matrix& grad_x,
                           const Matrix* grad_x_base, int64_t splits, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int64_t n = x.rows, in = x.cols, r_max = A.rows;
  const Acc* scale = static_cast<const Acc*>(p.scale);
  const auto hidden_of = [&](const Cluster& k, const Matrix& t) {
    return block<T>(t, 0, k.rank0, n, k.rank);
  };
  const auto grad_out_of = [&](const Cluster& k) {
    return columns(grad_out, p.row_index + k.row0, k.rows);
  };
  const auto x_of = [&](const Cluster& k, const Matrix& t) {
    return columns(t, p.col_index + k.col0, k.cols);
  };
  // grad_hidden_c = grad_hidden_in_c + s_c grad_out[:, R_c] B_c
  cudaError_t err = launch_writes<T>(
      p, grad_hidden, grad_hidden_in, scale,
      [&](const Cluster& k) {
        return Operands{n, k.rank, k.rows, grad_out_of(k), block<T>(B, k.row0, 0, k.rows, k.rank)};
      },
      hidden_of, stream);
  if (err != cudaSuccess) return err;
  // Both factor gradients sum over N: one launch, split over N, atomic adds.
  std::vector<AtomicProblem<T>> sums;
  Acc* gA = static_cast<Acc*>(grad_A_acc);
  Acc* gB = static_cast<Acc*>(grad_B_acc);
  for (int64_t c = 0; c < p.clusters; ++c) {
    const Cluster k = cluster(p, c);
    // grad_B[R_c block, :r_c] += s_c grad_out[:, R_c]ᵀ hidden_c
    sums.push_back({k.rows, k.rank, n, loader<T, Acc>(transposed(grad_out_of(k))),
                    loader<T, Acc>(hidden_of(k, hidden)),
                    AtomicAddEpilogue<Acc>{gB + k.row0 * r_max, r_max, scale + c}});
    // grad_A[:r_c, C_c block] += grad_hidden_cᵀ D(x)[:, C_c]
    sums.push_back({k.rank, k.cols, n, loader<T, Acc>(transposed(hidden_of(k, grad_hidden))),
                    loader<T, Acc>(x_of(k, x)), AtomicAddEpilogue<Acc>{gA + k.col0, in, nullptr}});
  }
  err = launch_tile_products<T>(sums.data(), int64_t(sums.size()), splits, stream);
  if (err != cudaSuccess) return err;
  // grad_x[:, C_c] = grad_x_base[:, C_c] + D(grad_hidden_c A_c)
  return launch_writes<T>(
      p, grad_x, grad_x_base, nullptr,
      [&](const Cluster& k) {
        return Operands{n, k.cols, k.rank, hidden_of(k, grad_hidden),
                        block<T>(A, 0, k.col0, k.rank, k.cols)};
      },
      x_of, stream);
}

bool valid(const ClusterPartition& p) {
  return p.clusters >= 1 && p.row_index != nullptr && p.col_index != nullptr &&
         p.row_offsets != nullptr && p.col_offsets != nullptr && p.rank_offsets != nullptr &&
         p.scale != nullptr;
}

}  // namespace

cudaError_t launch_cluster_forward(DType dtype, const ClusterPartition& partition,
                                   const Matrix& x, const Matrix& A, const Matrix& B,
                                   const Matrix& hidden, const Matrix& out, const Matrix* base,
                                   cudaStream_t stream) {
  if (!valid(partition)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(partition, x, A, B, hidden, out, base, stream);
    case DType::kFloat64:
      return forward_typed<double>(partition, x, A, B, hidden, out, base, stream);
    case DType::kFloat16:
      return forward_typed<__half>(partition, x, A, B, hidden, out, base, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(partition, x, A, B, hidden, out, base, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_cluster_backward(DType dtype, const ClusterPartition& partition,
                                    const Matrix& grad_out, const Matrix& x, const Matrix& A,
                                    const Matrix& B, const Matrix& hidden,
                                    const Matrix& grad_hidden, const Matrix* grad_hidden_in,
                                    void* grad_A_acc, void* grad_B_acc, const Matrix& grad_x,
                                    const Matrix* grad_x_base, int64_t splits,
                                    cudaStream_t stream) {
  if (!valid(partition)) return cudaErrorInvalidValue;
#define SOSLORA_CLUSTER_BACKWARD(T)                                                            \
  backward_typed<T>(partition, grad_out, x, A, B, hidden, grad_hidden, grad_hidden_in,         \
                    grad_A_acc, grad_B_acc, grad_x, grad_x_base, splits, stream)
  switch (dtype) {
    case DType::kFloat32: return SOSLORA_CLUSTER_BACKWARD(float);
    case DType::kFloat64: return SOSLORA_CLUSTER_BACKWARD(double);
    case DType::kFloat16: return SOSLORA_CLUSTER_BACKWARD(__half);
    case DType::kBFloat16: return SOSLORA_CLUSTER_BACKWARD(__nv_bfloat16);
  }
#undef SOSLORA_CLUSTER_BACKWARD
  return cudaErrorInvalidValue;
}

}  // namespace soslora::cuda
