// The glue that turns tensors into launches of the hand-written kernels (kernels.cu,
// lowrank_kernels.cu, fused_kernels.cu), and the check that they serve a device
// (have_cuda_kernels).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>

#include "../soslora.h"
#include "kernels.h"

namespace soslora {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "soslora: unsupported dtype on CUDA: ", t);
  }
}

// Split-K adds partial sums with float atomics in a schedule-dependent order: one split (one add
// per element, a fixed order) when torch.use_deterministic_algorithms(True) is on.
bool deterministic() { return at::globalContext().deterministicAlgorithms(); }

// The dropout seed as the kernels read it: {seed, offset} contiguous on the device (any layout
// is accepted, as on the CPU).
OptTensor contiguous_seed(const OptTensor& seed) {
  return seed.has_value() ? OptTensor(seed->contiguous()) : std::nullopt;
}

// The kernels' view of a tensor (sizes and strides as they are: transposed views need no copy).
// A dropout seed must come from contiguous_seed and outlive the launch.
cuda::Matrix matrix(const Tensor& t, const OptTensor& dropout_seed = std::nullopt,
                    double dropout_p = 0.0) {
  cuda::Matrix m;
  m.data = t.data_ptr();
  m.rows = t.size(0);
  m.cols = t.size(1);
  m.stride0 = t.stride(0);
  m.stride1 = t.stride(1);
  if (dropout_p > 0) {
    TORCH_INTERNAL_ASSERT(t.is_contiguous() && dropout_seed->is_contiguous(),
                          "soslora: dropout is indexed on contiguous tensors");
    m.dropout_seed = dropout_seed->data_ptr<int64_t>();
    m.dropout_p = dropout_p;
  }
  return m;
}

// left @ right combined into out; the ops have checked shapes and dtypes (all left's dtype,
// except a kAtomicAdd output, which is in the accumulation type).
void launch_product(at::ScalarType dtype, const cuda::Matrix& left, const cuda::Matrix& right,
                    const cuda::Matrix& out, cuda::Combine combine, int64_t splits = 1) {
  TORCH_INTERNAL_ASSERT(left.cols == right.rows && out.rows == left.rows &&
                        out.cols == right.cols);
  C10_CUDA_CHECK(cuda::launch_product(kernel_dtype(dtype), left, right, out, combine, splits,
                                      c10::cuda::getCurrentCUDAStream()));
}

// Output tiles of an M x N product on the tile engine (64 x 64).
int64_t tiles(int64_t M, int64_t N) { return ((M + 63) / 64) * ((N + 63) / 64); }

// How many ways to split a sum over n rows that fills only `tiles` output tiles: until the grid
// has a few blocks per SM (512 blocks), at least 256 rows per split; one split (a fixed order)
// when torch.use_deterministic_algorithms(True) is on.
int64_t sum_splits(int64_t tiles, int64_t n) {
  if (deterministic()) return 1;
  return std::clamp<int64_t>(512 / std::max<int64_t>(tiles, 1), 1,
                             std::max<int64_t>((n + 255) / 256, 1));
}

// The device's SM count, asked once per device (the calls read it lock-free).
int64_t sm_count(const c10::Device& device) {
  static std::array<std::atomic<int>, 64> known{};
  const int index = device.index();
  TORCH_INTERNAL_ASSERT(index >= 0 && index < static_cast<int>(known.size()));
  if (const int n = known[index].load(std::memory_order_relaxed)) return n;
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, index));
  known[index].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace

// Arguments checked by merge_into_ (merge.cpp), which forms the factors in the accumulation
// dtype: the rule is the CPU's (float32, or float64 for float64 weights or factors).
Tensor merge_into_cuda_(at::Tensor& weight, const Tensor& A_acc, const Tensor& Bs_acc,
                        double alpha, const Tensor& write) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor A_c = A_acc.contiguous(), Bs_c = Bs_acc.contiguous();
  Tensor stats = at::zeros({4}, weight.options().dtype(at::kLong));
  Tensor refused = at::zeros({cuda::merge_tiles(weight.size(0), weight.size(1))},
                             weight.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::launch_merge(
      weight.data_ptr(), kernel_dtype(weight.scalar_type()), weight.size(0), weight.size(1),
      weight.stride(0), weight.stride(1), Bs_c.data_ptr(), A_c.data_ptr(), A_c.size(0),
      A_c.scalar_type() == at::kDouble, alpha, write.defined() ? write.data_ptr<bool>() : nullptr,
      stats.data_ptr<int64_t>(), refused.data_ptr<uint8_t>(),
      c10::cuda::getCurrentCUDAStream()));
  return stats;
}

Tensor weight_stats_cuda(const Tensor& weight) {
  const c10::cuda::CUDAGuard guard(weight.device());
  Tensor stats = at::zeros({4}, weight.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::launch_weight_stats(
      weight.data_ptr(), kernel_dtype(weight.scalar_type()), weight.size(0), weight.size(1),
      weight.stride(0), weight.stride(1), stats.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream()));
  return stats;
}

// Arguments checked, and the kernels chosen, by ortho_penalty_grad_ (ortho.cpp).
void ortho_penalty_grad_cuda_(at::Tensor& grad_A, const Tensor& A, const Tensor& weight,
                              int64_t num_experts) {
  const c10::NoGradGuard no_grad;  // updates a gradient: not differentiable
  const c10::cuda::CUDAGuard guard(A.device());
  const auto acc = accumulate_dtype(A.scalar_type());
  const Tensor A_c = A.contiguous();
  const Tensor weight_acc = weight.reshape({1}).to(acc);  // read on the device: no host sync
  Tensor workspace = at::empty({2, A.size(0), A.size(0)}, A.options().dtype(acc));
  workspace[0].zero_();  // the Gram matrix is accumulated atomically
  C10_CUDA_CHECK(cuda::launch_ortho_penalty_grad(
      kernel_dtype(A.scalar_type()), grad_A.data_ptr(), A_c.data_ptr(), A.size(0), A.size(1),
      num_experts, weight_acc.data_ptr(), workspace.data_ptr(), deterministic(),
      c10::cuda::getCurrentCUDAStream()));
}

bool have_cuda_kernels(const Tensor& t) {
  if (!t.is_cuda()) return false;
  // Asked once per device (every op call reads the answer, lock-free): does this build hold
  // machine code (or PTX) for it? 0 = not asked yet, 1 = yes, -1 = no.
  static std::array<std::atomic<int8_t>, 64> known{};
  const int device = t.device().index();
  TORCH_CHECK(device >= 0 && device < static_cast<int>(known.size()),
              "soslora_ext: CUDA device index ", device, " is beyond the ", known.size(),
              " devices it supports");
  if (const int8_t answer = known[device].load(std::memory_order_relaxed)) return answer > 0;
  const c10::cuda::CUDAGuard guard(t.device());
  const cudaError_t err = cuda::kernel_image_status();
  (void)cudaGetLastError();  // a missing image is not an error of the next launch
  if (err != cudaSuccess) {
    cudaDeviceProp props{};
    C10_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
    TORCH_WARN("soslora_ext: the CUDA kernels were not built for ", props.name, " (sm_",
               props.major, props.minor, "): ", cudaGetErrorString(err),
               ". Using the ATen implementations on this device (same results; rebuild with "
               "SOSLORA_CUDA_ARCH including ", props.major, ".", props.minor,
               " for the kernels).");
  }
  known[device].store(err == cudaSuccess ? 1 : -1, std::memory_order_relaxed);
  return err == cudaSuccess;
}

void synchronize_device(const Tensor& t) {
  const c10::cuda::CUDAGuard guard(t.device());
  C10_CUDA_CHECK(cudaDeviceSynchronize());
}

bool stream_capturing(const Tensor& t) {
  const c10::cuda::CUDAGuard guard(t.device());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

Tensor lowrank_hidden_cuda(const Tensor& x, const Tensor& A, const OptTensor& dropout_seed,
                           double dropout_p, bool dropout_on_input) {
  const c10::cuda::CUDAGuard guard(x.device());
  const double p_in = dropout_on_input ? dropout_p : 0.0;
  const double p_out = dropout_on_input ? 0.0 : dropout_p;
  const Tensor x_c = p_in > 0 ? x.contiguous() : x;
  const OptTensor seed = contiguous_seed(dropout_seed);
  const int64_t n = x.size(0), r = A.size(0), in = x.size(1);
  const Tensor A_t = A.t();
  // [N, r] is skinny (N = 8192, r = 64: 128 tiles): where that leaves SMs idle, the sum over
  // `in` is split into a float sum (atomics), rounded and dropped afterwards as ATen does.
  const int64_t out_tiles = std::max<int64_t>(tiles(n, r), 1);
  const int64_t splits =
      deterministic() ? 1
                      : std::clamp<int64_t>((2 * sm_count(x.device()) + out_tiles - 1) / out_tiles, 1,
                                            std::max<int64_t>(in / 512, 1));
  if (splits > 1) {
    Tensor sum = at::zeros({n, r}, x.options().dtype(accumulate_dtype(x.scalar_type())));
    launch_product(x.scalar_type(), matrix(x_c, seed, p_in), matrix(A_t), matrix(sum),
                   cuda::Combine::kAtomicAdd, splits);
    return dropout_apply(sum.to(x.scalar_type()), seed, p_out);
  }
  Tensor hidden = at::empty({n, r}, x.options());
  launch_product(x.scalar_type(), matrix(x_c, seed, p_in), matrix(A_t),
                 matrix(hidden, seed, p_out), cuda::Combine::kStore);
  return hidden;
}

void add_product_cuda_(Tensor& out, const Tensor& left, const Tensor& right,
                       const OptTensor& dropout_seed, double dropout_p) {
  const c10::cuda::CUDAGuard guard(out.device());
  TORCH_INTERNAL_ASSERT(dropout_p == 0 || out.is_contiguous());
  const OptTensor seed = contiguous_seed(dropout_seed);
  launch_product(out.scalar_type(), matrix(left), matrix(right), matrix(out, seed, dropout_p),
                 cuda::Combine::kAdd);
}

Tensor lowrank_grad_A_cuda(const Tensor& grad_hidden, const Tensor& x,
                           const OptTensor& dropout_seed, double dropout_p) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = accumulate_dtype(x.scalar_type());
  const Tensor x_c = dropout_p > 0 ? x.contiguous() : x;
  const Tensor gh_t = grad_hidden.t();
  // [r, in] is small: split the sum over N until the grid has a few blocks per SM.
  const int64_t r = grad_hidden.size(1), in = x.size(1), n = x.size(0);
  const int64_t splits = sum_splits(tiles(r, in), n);
  const OptTensor seed = contiguous_seed(dropout_seed);
  Tensor grad_A = at::zeros({r, in}, x.options().dtype(acc));
  launch_product(x.scalar_type(), matrix(gh_t), matrix(x_c, seed, dropout_p), matrix(grad_A),
                 cuda::Combine::kAtomicAdd, splits);
  return grad_A.to(x.scalar_type());
}

std::tuple<Tensor, Tensor> grad_hidden_and_B_cuda(const Tensor& grad_out, const Tensor& scaled_B,
                                                  const Tensor& hidden,
                                                  const OptTensor& dropout_seed,
                                                  double dropout_p, bool need_hidden,
                                                  bool need_B, const OptTensor& scale,
                                                  at::ScalarType grad_B_dtype) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto dtype = grad_out.scalar_type(), acc = accumulate_dtype(dtype);
  TORCH_INTERNAL_ASSERT(grad_B_dtype == dtype || grad_B_dtype == acc);
  const int64_t N = grad_out.size(0), out = grad_out.size(1), r = hidden.size(1);
  const OptTensor seed = contiguous_seed(dropout_seed);
  Tensor grad_hidden, grad_B, scale_acc, workspace;
  cuda::Matrix grad_h;  // data nullptr: not computed
  if (need_hidden) {
    grad_hidden = at::empty({N, r}, grad_out.options());
    grad_h = matrix(grad_hidden, seed, dropout_p);
  }
  cuda::GradBOutput grad_b;
  // Blocks along N: at least one per SM where N allows. Deterministic: each block writes and
  // the reduction reads a [out, r] slice of the workspace, so half as many blocks as SMs (each
  // summing several bands; about where the slower read of grad_out by fewer blocks meets the
  // slices' traffic at N = 8192, r = 64), and at most 256 MiB of slices.
  const int64_t sms = sm_count(grad_out.device());
  const bool det = deterministic();
  const int64_t slice_bytes = std::max<int64_t>(out * r * c10::elementSize(acc), 1);
  const int64_t max_splits =
      det ? std::max<int64_t>(1, std::min<int64_t>(sms / 2, (int64_t{256} << 20) / slice_bytes))
          : 0;
  if (need_B) {
    grad_B = at::empty({out, r}, grad_out.options().dtype(grad_B_dtype));
    grad_b.data = grad_B.data_ptr();
    grad_b.stride0 = grad_B.stride(0);
    grad_b.stride1 = grad_B.stride(1);
    grad_b.acc_type = grad_B_dtype != dtype;
    if (scale.has_value()) {  // [G] or [G, out]: one scale per group of r / G ranks
      scale_acc = scale->to(acc);
      grad_b.scale.data = scale_acc.data_ptr();
      grad_b.scale.group = r / scale_acc.size(0);
      grad_b.scale.group_stride = scale_acc.stride(0);
      grad_b.scale.row_stride = scale_acc.dim() == 2 ? scale_acc.stride(1) : 0;
    }
    workspace = at::empty({cuda::grad_hidden_and_B_workspace(kernel_dtype(dtype), N, out, r, sms,
                                                             max_splits, det)},
                          grad_out.options().dtype(acc));
  }
  C10_CUDA_CHECK(cuda::launch_grad_hidden_and_B(
      kernel_dtype(dtype), matrix(grad_out), matrix(scaled_B), matrix(hidden), grad_h, grad_b,
      need_B ? workspace.data_ptr() : nullptr, sms, max_splits, det,
      c10::cuda::getCurrentCUDAStream()));
  return {grad_hidden, grad_B};
}

Tensor dropout_scale_mask_cuda(const Tensor& seed, at::IntArrayRef sizes, double p,
                               at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(seed.device());
  Tensor mask = at::empty(sizes, seed.options().dtype(dtype));
  const Tensor seed_c = seed.contiguous();
  C10_CUDA_CHECK(cuda::launch_dropout_mask(mask.data_ptr(), kernel_dtype(dtype), mask.numel(),
                                           seed_c.data_ptr<int64_t>(), p,
                                           c10::cuda::getCurrentCUDAStream()));
  return mask;
}

Tensor dropout_apply_cuda(const Tensor& t, const Tensor& seed, double p) {
  const c10::cuda::CUDAGuard guard(t.device());
  const Tensor in = t.contiguous();
  Tensor out = at::empty_like(in);
  const Tensor seed_c = seed.contiguous();
  C10_CUDA_CHECK(cuda::launch_dropout_apply(out.data_ptr(), in.data_ptr(),
                                            kernel_dtype(in.scalar_type()), in.numel(),
                                            seed_c.data_ptr<int64_t>(), p,
                                            c10::cuda::getCurrentCUDAStream()));
  return out;
}

// ---- CPS-LoRA's cluster form (cluster_kernels.cu) -----------------------------------------------
namespace {

// The partition as the kernels read it: the index tensors contiguous, the scale in the
// accumulation type on the device (no sync), the offsets on the host.
struct Partition {
  Tensor row_index, col_index, scale;
  std::vector<int64_t> row_offsets, col_offsets;
  const std::vector<int64_t>& rank_offsets;

  Partition(const Tensor& scale_, const Tensor& row_index_, const Tensor& col_index_,
            at::IntArrayRef row_offsets_, at::IntArrayRef col_offsets_,
            const std::vector<int64_t>& rank_offsets_, at::ScalarType dtype)
      : row_index(row_index_.contiguous()), col_index(col_index_.contiguous()),
        scale(scale_.to(accumulate_dtype(dtype)).contiguous()), row_offsets(row_offsets_.vec()),
        col_offsets(col_offsets_.vec()), rank_offsets(rank_offsets_) {}
  cuda::ClusterPartition view() const {
    return {static_cast<int64_t>(rank_offsets.size()) - 1, row_index.data_ptr<int64_t>(),
            col_index.data_ptr<int64_t>(), row_offsets.data(), col_offsets.data(),
            rank_offsets.data(), scale.data_ptr()};
  }
};

}  // namespace

// Arguments checked by cluster_lowrank_forward (cluster.cpp).
std::tuple<Tensor, Tensor> cluster_lowrank_forward_cuda(
    const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, const std::vector<int64_t>& rank_offsets,
    const OptTensor& base_out, const OptTensor& dropout_seed, double dropout_p) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Partition p(scale, row_index, col_index, row_offsets, col_offsets, rank_offsets,
                    x.scalar_type());
  const Tensor x_c = dropout_p > 0 ? x.contiguous() : x;
  const OptTensor seed = contiguous_seed(dropout_seed);
  Tensor hidden = at::empty({x.size(0), rank_offsets.back()}, x.options());
  // Every output column is written once (row_index is a permutation), added to the base.
  Tensor out = base_out.has_value() ? at::empty({x.size(0), B.size(0)}, x.options())
                                    : at::zeros({x.size(0), B.size(0)}, x.options());
  const cuda::Matrix base = base_out.has_value() ? matrix(*base_out) : cuda::Matrix{};
  C10_CUDA_CHECK(cuda::launch_cluster_forward(
      kernel_dtype(x.scalar_type()), p.view(), matrix(x_c, seed, dropout_p), matrix(A), matrix(B),
      matrix(hidden), matrix(out), base_out.has_value() ? &base : nullptr,
      c10::cuda::getCurrentCUDAStream()));
  return {out, hidden};
}

// Arguments checked by cluster_lowrank_backward (cluster.cpp).
std::tuple<Tensor, Tensor, Tensor> cluster_lowrank_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& A, const Tensor& B,
    const Tensor& scale, const Tensor& hidden, const OptTensor& grad_hidden,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, const std::vector<int64_t>& rank_offsets,
    const OptTensor& grad_x_base, const OptTensor& dropout_seed, double dropout_p) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Partition p(scale, row_index, col_index, row_offsets, col_offsets, rank_offsets,
                    x.scalar_type());
  const auto acc = accumulate_dtype(x.scalar_type());
  const Tensor x_c = dropout_p > 0 ? x.contiguous() : x;
  const OptTensor seed = contiguous_seed(dropout_seed);
  const int64_t n = x.size(0), in = x.size(1), out = B.size(0), r_max = A.size(0);
  Tensor grad_h = at::empty({n, rank_offsets.back()}, x.options());
  Tensor grad_A = at::zeros({r_max, in}, x.options().dtype(acc));  // atomic sums
  Tensor grad_B = at::zeros({out, r_max}, x.options().dtype(acc));
  Tensor grad_x = grad_x_base.has_value() ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                          : at::zeros_like(x, at::MemoryFormat::Contiguous);
  int64_t sum_tiles = 0;  // the factor gradients' output tiles, all clusters
  for (size_t c = 0; c + 1 < rank_offsets.size(); ++c) {
    const int64_t r = rank_offsets[c + 1] - rank_offsets[c];
    sum_tiles += tiles(row_offsets[c + 1] - row_offsets[c], r) +
                 tiles(r, col_offsets[c + 1] - col_offsets[c]);
  }
  const cuda::Matrix gh_in = grad_hidden.has_value() ? matrix(*grad_hidden) : cuda::Matrix{};
  const cuda::Matrix gx_base = grad_x_base.has_value() ? matrix(*grad_x_base) : cuda::Matrix{};
  C10_CUDA_CHECK(cuda::launch_cluster_backward(
      kernel_dtype(x.scalar_type()), p.view(), matrix(grad_out), matrix(x_c, seed, dropout_p),
      matrix(A), matrix(B), matrix(hidden), matrix(grad_h),
      grad_hidden.has_value() ? &gh_in : nullptr, grad_A.data_ptr(), grad_B.data_ptr(),
      matrix(grad_x, seed, dropout_p), grad_x_base.has_value() ? &gx_base : nullptr,
      sum_splits(sum_tiles, n), c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_A.to(x.scalar_type()), grad_B.to(x.scalar_type())};
}

}  // namespace soslora
