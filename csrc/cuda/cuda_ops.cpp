// The glue that turns tensors into launches of the hand-written kernels (kernels.cu,
// lowrank_kernels.cu), and the check that they serve a device (have_cuda_kernels).
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

bool use_cuda_kernels(const Tensor& t) {
  // Measured on an H100 (bf16, N = 8192, 4096-wide layers): cuBLAS is faster for every product,
  // input dropout included (the kernels save a transient [N, in] buffer but take up to 2x the
  // step), so only an explicit "kernels" choice uses them.
  return cuda_path() == CudaPath::kKernels && have_cuda_kernels(t);
}

Tensor lowrank_hidden_cuda(const Tensor& x, const Tensor& A, const OptTensor& dropout_seed,
                           double dropout_p, bool dropout_on_input) {
  const c10::cuda::CUDAGuard guard(x.device());
  const double p_in = dropout_on_input ? dropout_p : 0.0, p_out = dropout_on_input ? 0.0 : dropout_p;
  const Tensor x_c = p_in > 0 ? x.contiguous() : x;
  const OptTensor seed = contiguous_seed(dropout_seed);
  Tensor hidden = at::empty({x.size(0), A.size(0)}, x.options());
  const Tensor A_t = A.t();
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
  const int64_t tiles = ((r + 63) / 64) * ((in + 63) / 64);
  const int64_t splits =
      deterministic() ? 1
                      : std::clamp<int64_t>(512 / std::max<int64_t>(tiles, 1), 1,
                                            std::max<int64_t>((n + 255) / 256, 1));
  const OptTensor seed = contiguous_seed(dropout_seed);
  Tensor grad_A = at::zeros({r, in}, x.options().dtype(acc));
  launch_product(x.scalar_type(), matrix(gh_t), matrix(x_c, seed, dropout_p), matrix(grad_A),
                 cuda::Combine::kAtomicAdd, splits);
  return grad_A.to(x.scalar_type());
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

}  // namespace soslora
