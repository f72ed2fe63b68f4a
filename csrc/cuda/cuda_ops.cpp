// CUDA registrations: the device-generic ops (soslora.h) plus the glue that checks tensors and
// launches the hand-written kernels of kernels.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

void merge_into_cuda_(at::Tensor& weight, const Tensor& A, const Tensor& B, const Tensor& scale,
                      double alpha) {
  check_merge_args(weight, A, B, scale);
  const c10::NoGradGuard no_grad;  // updates a gradient or frozen weight: not differentiable
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto acc = accumulate_dtype(weight.scalar_type());
  // The factors are small ([r, in], [out, r]): fold the scale once, in the accumulation type.
  const Tensor A_acc = A.to(acc).contiguous();
  const Tensor Bs_acc = (B.to(acc) * scale.to(acc)).contiguous();
  C10_CUDA_CHECK(cuda::launch_merge(weight.data_ptr(), kernel_dtype(weight.scalar_type()),
                                    weight.size(0), weight.size(1), weight.stride(0),
                                    weight.stride(1), Bs_acc.data_ptr(), A_acc.data_ptr(),
                                    A.size(0), acc == at::kDouble, alpha,
                                    c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

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

TORCH_LIBRARY_IMPL(soslora, CUDA, m) {
  soslora::register_device_generic_kernels(m);
  m.impl("merge_into_", &soslora::merge_into_cuda_);
}
