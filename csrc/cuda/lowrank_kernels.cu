// Low-rank products and the orthogonality-penalty gradient on the tile engine (tile_product.cuh):
// dropout masks are applied as tiles are read or results written, so no full-size temporary
// ([N, in] or [N, out]) is ever formed.
#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "matrix_access.cuh"
#include "numeric.cuh"
#include "tile_product.cuh"

namespace soslora::cuda {
namespace {

constexpr double kNormEps = 1e-6;  // as ortho.cpp (F.normalize's eps in the reference code)

// An epilogue that is switched off while a device scalar is zero (see tile_product.cuh).
template <typename Acc, class Epilogue> struct UnlessZero {
  Epilogue inner;
  const Acc* weight;
  __device__ __forceinline__ bool active() const { return weight[0] != Acc(0); }
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, Acc v) const { inner(m, n, v); }
};

template <typename T>
cudaError_t product_typed(const Matrix& left, const Matrix& right, const Matrix& out,
                          Combine combine, int64_t splits, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int64_t M = left.rows, K = left.cols, N = right.cols;
  const auto L = loader<T, Acc>(left);
  const auto R = loader<T, Acc>(right);
  switch (combine) {
    case Combine::kStore:
      return launch_tile_product<T>(M, N, K, 1, L, R, writer<T, Acc, false>(out), stream);
    case Combine::kAdd:
      return launch_tile_product<T>(M, N, K, 1, L, R, writer<T, Acc, true>(out), stream);
    case Combine::kAtomicAdd:
      if (out.dropout_seed != nullptr || out.stride1 != 1 || out.row_map != nullptr ||
          out.col_map != nullptr)
        return cudaErrorInvalidValue;
      return launch_tile_product<T>(
          M, N, K, splits, L, R,
          AtomicAddEpilogue<Acc>{static_cast<Acc*>(const_cast<void*>(out.data)), out.stride0},
          stream);
  }
  return cudaErrorInvalidValue;
}

// ---- orthogonality penalty ---------------------------------------------------------------------
// With g the Gram matrix of A's rows, n'_i = max(sqrt(g_ii), eps), Ĝ_ij = g_ij / (n'_i n'_j),
// c_ij = 1 across experts, s = 4 weight / (K (K-1) r²) and radial_i = sum_j c_ij Ĝ_ij²:
//   grad_A_i = sum_j L_ij A_j,  L_ij = s (c_ij Ĝ_ij / n'_j - [i = j, g_ii > eps²] radial_i / n'_i) / n'_i
// which is d/dA of s/4 * sum(c Ĝ²) through the row normalization (as ortho.cpp computes it).
// L is small ([r_tot, r_tot]): one thread per element writes it once, so the product that
// follows reads it as a plain matrix.
template <typename Acc>
__global__ void penalty_coefficients_kernel(Acc* L, const Acc* gram, int64_t r_tot,
                                            int64_t rows_per_expert, const Acc* weight,
                                            Acc inv_denom) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= r_tot * r_tot || weight[0] == Acc(0)) return;
  const int64_t i = idx / r_tot, j = idx % r_tot;
  const auto norm = [&](int64_t k) { return max(sqrt(gram[k * r_tot + k]), Acc(kNormEps)); };
  const Acc n_i = norm(i), s = Acc(4) * weight[0] * inv_denom;
  Acc value = 0;
  if (i / rows_per_expert != j / rows_per_expert) {
    const Acc n_j = norm(j);
    value = s * (gram[i * r_tot + j] / (n_i * n_j)) / n_j / n_i;
  } else if (i == j && sqrt(gram[i * r_tot + i]) > Acc(kNormEps)) {
    Acc radial = 0;
    for (int64_t k = 0; k < r_tot; ++k) {
      if (k / rows_per_expert == i / rows_per_expert) continue;
      const Acc g_hat = gram[i * r_tot + k] / (n_i * norm(k));
      radial += g_hat * g_hat;
    }
    value = -s * radial / n_i / n_i;
  }
  L[idx] = value;
}

template <typename T>
cudaError_t ortho_penalty_grad_typed(void* grad_A, const void* A, int64_t r_tot, int64_t in,
                                     int64_t num_experts, const void* weight, void* workspace,
                                     bool deterministic, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const Matrix a{A, r_tot, in, in, 1}, a_t{A, in, r_tot, 1, in};
  Acc* gram = static_cast<Acc*>(workspace);
  Acc* L = gram + r_tot * r_tot;
  const Acc* w = static_cast<const Acc*>(weight);  // every launch does nothing while it is 0
  // Launch 1: gram = A Aᵀ, K = in split so that the r_tot² result still fills the GPU (or one
  // split when `deterministic`: atomics then add in a fixed order).
  const int64_t splits =
      deterministic ? 1 : std::max<int64_t>(1, std::min<int64_t>(in / 256, 128));
  cudaError_t err = launch_tile_product<T>(
      r_tot, r_tot, in, splits, loader<T, Acc>(a), loader<T, Acc>(a_t),
      UnlessZero<Acc, AtomicAddEpilogue<Acc>>{{gram, r_tot}, w}, stream);
  if (err != cudaSuccess) return err;
  // Launch 2: the coefficients L.
  const double k = static_cast<double>(num_experts), r = static_cast<double>(r_tot / num_experts);
  constexpr int threads = 256;
  const int64_t blocks = (r_tot * r_tot + threads - 1) / threads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  penalty_coefficients_kernel<Acc><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      L, gram, r_tot, r_tot / num_experts, w,
      static_cast<Acc>(1.0 / (k * (k - 1) * r * r)));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  // Launch 3: grad_A += L A, in the accumulation type (L is not rounded to T).
  const Matrix l{L, r_tot, r_tot, r_tot, 1}, g{grad_A, r_tot, in, in, 1};
  return launch_tile_product<Acc>(
      r_tot, in, r_tot, 1, loader<Acc, Acc>(l), loader<T, Acc>(a),
      UnlessZero<Acc, WriteEpilogue<T, Acc, true>>{writer<T, Acc, true>(g), w}, stream);
}

}  // namespace

cudaError_t launch_product(DType dtype, const Matrix& left, const Matrix& right,
                           const Matrix& out, Combine combine, int64_t splits,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return product_typed<float>(left, right, out, combine, splits, stream);
    case DType::kFloat64:
      return product_typed<double>(left, right, out, combine, splits, stream);
    case DType::kFloat16:
      return product_typed<__half>(left, right, out, combine, splits, stream);
    case DType::kBFloat16:
      return product_typed<__nv_bfloat16>(left, right, out, combine, splits,
                                          stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_ortho_penalty_grad(DType dtype, void* grad_A, const void* A, int64_t r_tot,
                                      int64_t in, int64_t num_experts, const void* weight,
                                      void* workspace, bool deterministic, cudaStream_t stream) {
  if (num_experts < 2 || r_tot == 0 || r_tot % num_experts != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return ortho_penalty_grad_typed<float>(grad_A, A, r_tot, in, num_experts, weight, workspace,
                                             deterministic, stream);
    case DType::kFloat64:
      return ortho_penalty_grad_typed<double>(grad_A, A, r_tot, in, num_experts, weight, workspace,
                                              deterministic, stream);
    case DType::kFloat16:
      return ortho_penalty_grad_typed<__half>(grad_A, A, r_tot, in, num_experts, weight, workspace,
                                              deterministic, stream);
    case DType::kBFloat16:
      return ortho_penalty_grad_typed<__nv_bfloat16>(grad_A, A, r_tot, in, num_experts, weight,
                                                     workspace, deterministic, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace soslora::cuda
