// Op schemas (namespace `soslora`) and their CPU kernels; the Python module `_C` that loading
// this library creates only reports how it was built.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <string>

#include "adapted_linear.h"
#include "dispatch.h"

TORCH_LIBRARY(soslora, m) {
  // An adapted layer's training step, one autograd node (autograd.cpp): base (weight and bias,
  // or base_out, or none) plus the low-rank update of A, B and scale (or of CPS-LoRA's cluster
  // blocks when row_index is given: dense factors when dense_blocks, else the cluster op),
  // the scale times a gate K softmax(gate_logits / gate_temperature) when given. The backward
  // adds ortho_lambda * the orthogonality penalty's gradient (when given) to A's gradient and
  // multiplies it by grad_A_multiplier, adds uniform_prior (p - 1/K) / T to the logits' and
  // scale_anchor (scale - anchor_scales) to the scale's. Draws its dropout seed when
  // dropout_p > 0.
  m.def(
      "adapted_linear(Tensor x, Tensor? weight, Tensor? bias, Tensor? base_out, Tensor A, "
      "Tensor B, Tensor scale, Tensor? row_index, Tensor? col_index, int[] row_offsets, "
      "int[] col_offsets, int[] ranks, bool dense_blocks, float dropout_p, "
      "bool dropout_on_input, Tensor? ortho_lambda, int num_experts, float grad_A_multiplier, "
      "Tensor? gate_logits, Tensor? gate_temperature, float uniform_prior, "
      "Tensor? anchor_scales, float scale_anchor) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // Its two halves: the forward returns (out, hidden, scaled_B), the backward every gradient
  // (undefined where output_mask says none is needed); not differentiable.
  m.def(
      "adapted_linear_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? base_out, "
      "Tensor A, Tensor B, Tensor scale, Tensor? row_index, Tensor? col_index, "
      "int[] row_offsets, int[] col_offsets, int[] ranks, Tensor? dropout_seed, "
      "float dropout_p, bool dropout_on_input) -> (Tensor, Tensor, Tensor)");
  m.def(
      "adapted_linear_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor A, Tensor B, "
      "Tensor scale, Tensor hidden, Tensor scaled_B, Tensor? row_index, Tensor? col_index, "
      "int[] row_offsets, int[] col_offsets, int[] ranks, Tensor? dropout_seed, "
      "float dropout_p, bool dropout_on_input, Tensor? ortho_lambda, int num_experts, "
      "float grad_A_multiplier, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // (seed, offset) for the dropout masks, drawn from torch's generator for like's device.
  m.def("dropout_seed(Tensor like) -> Tensor", {at::Tag::nondeterministic_seeded});
  // out = base_out + h (B*scale)^T, h = drop(x A^T) or drop(x) A^T; returns (out, h).
  m.def(
      "lowrank_forward(Tensor x, Tensor A, Tensor B, Tensor scale, Tensor? base_out, "
      "Tensor? dropout_seed, float dropout_p, bool dropout_on_input) -> (Tensor, Tensor)");
  // The frozen linear layer plus its adapter, in one [N, out] buffer: returns (out, h).
  m.def(
      "linear_lowrank_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, "
      "Tensor scale, Tensor? dropout_seed, float dropout_p, bool dropout_on_input) "
      "-> (Tensor, Tensor)");
  // grad_x = grad_out weight + D_in(grad_hidden A), in one [N, in] buffer.
  m.def(
      "linear_lowrank_grad_x(Tensor grad_out, Tensor weight, Tensor grad_hidden, Tensor A, "
      "Tensor? dropout_seed, float dropout_p, bool dropout_on_input) -> Tensor");
  // From grad_out: (grad wrt A-side product x A^T or drop(x) A^T, grad_B, grad_scale).
  m.def(
      "lowrank_grad_hidden(Tensor grad_out, Tensor B, Tensor scale, Tensor hidden, "
      "Tensor? dropout_seed, float dropout_p, bool dropout_on_input) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lowrank_grad_A(Tensor grad_hidden, Tensor x, Tensor? dropout_seed, float dropout_p, "
      "bool dropout_on_input) -> Tensor");
  // grad_x = grad_hidden A (masked for input dropout) + grad_x_base.
  m.def(
      "lowrank_grad_x(Tensor grad_hidden, Tensor A, Tensor? grad_x_base, Tensor? dropout_seed, "
      "float dropout_p, bool dropout_on_input) -> Tensor");
  // Input dropout's backward from one mask draw: grad_x += D_in(grad_hidden A) in place;
  // returns grad_A = grad_hidden^T D_in(x). Not differentiable (used without create_graph).
  m.def(
      "input_dropout_grads_(Tensor(a!) grad_x, Tensor grad_hidden, Tensor A, Tensor x, "
      "Tensor dropout_seed, float dropout_p) -> Tensor");
  // The dropout scale mask (0 or 1/(1-p)) that the ops above apply for a given seed and shape.
  m.def("dropout_mask(Tensor dropout_seed, SymInt[] size, float dropout_p, ScalarType dtype) -> Tensor");
  m.def("ortho_penalty(Tensor A, int num_experts) -> Tensor");
  // grad_A += weight * d(ortho_penalty)/dA; weight is a one-element tensor (read on device).
  m.def("ortho_penalty_grad_(Tensor(a!) grad_A, Tensor A, Tensor weight, int num_experts) -> ()");
  // CPS-LoRA: low-rank terms local to clusters of rows and columns (see soslora.h).
  m.def(
      "cluster_lowrank_forward(Tensor x, Tensor A, Tensor B, Tensor scale, Tensor row_index, "
      "Tensor col_index, int[] row_offsets, int[] col_offsets, int[] ranks, Tensor? base_out, "
      "Tensor? dropout_seed, float dropout_p) -> (Tensor, Tensor)");
  m.def(
      "cluster_lowrank_backward(Tensor grad_out, Tensor x, Tensor A, Tensor B, Tensor scale, "
      "Tensor hidden, Tensor? grad_hidden, Tensor row_index, Tensor col_index, int[] row_offsets, int[] col_offsets, "
      "int[] ranks, Tensor? grad_x_base, Tensor? dropout_seed, float dropout_p) "
      "-> (Tensor, Tensor, Tensor)");
  // weight += alpha * (B*scale) @ A, accumulated in float32, rounded once; returns the stats of
  // the weight written (soslora.h). With max_abs, only where the guard's bound holds.
  m.def(
      "merge_into_(Tensor(a!) weight, Tensor A, Tensor B, Tensor scale, float alpha, "
      "float? max_abs=None) -> Tensor");
  // A weight's max |w| and fingerprint (soslora.h), in one read.
  m.def("weight_stats(Tensor weight) -> Tensor");
}

namespace soslora {
namespace {
std::atomic<CudaPath> g_cuda_path{CudaPath::kAuto};
std::atomic<bool> g_cpu_takes_cuda_fallback{false};
}  // namespace
void set_cuda_path(CudaPath path) { g_cuda_path.store(path); }
CudaPath cuda_path() { return g_cuda_path.load(); }
void set_cpu_takes_cuda_fallback(bool on) { g_cpu_takes_cuda_fallback.store(on); }
bool cpu_takes_cuda_fallback() { return g_cpu_takes_cuda_fallback.load(); }

#ifndef SOSLORA_WITH_CUDA
bool have_cuda_kernels(const Tensor&) { return false; }
#endif

namespace {
// Every op has one entry point for every device: it uses the hand-written CUDA kernels where
// have_cuda_kernels() says so and ATen otherwise, so CUDA tensors work in any build.
void register_kernels(torch::Library& m) {
  m.impl("adapted_linear", &adapted_linear);
  m.impl("adapted_linear_forward", &adapted_linear_forward);
  m.impl("adapted_linear_backward", &adapted_linear_backward);
  m.impl("dropout_seed", &dropout_seed);
  m.impl("lowrank_forward", &lowrank_forward);
  m.impl("linear_lowrank_forward", &linear_lowrank_forward);
  m.impl("linear_lowrank_grad_x", &linear_lowrank_grad_x);
  m.impl("lowrank_grad_hidden", &lowrank_grad_hidden);
  m.impl("lowrank_grad_A", &lowrank_grad_A);
  m.impl("lowrank_grad_x", &lowrank_grad_x);
  m.impl("input_dropout_grads_", &input_dropout_grads_);
  m.impl("cluster_lowrank_forward", &cluster_lowrank_forward);
  m.impl("cluster_lowrank_backward", &cluster_lowrank_backward);
  m.impl("dropout_mask", &dropout_mask);
  m.impl("ortho_penalty", &ortho_penalty);
  m.impl("ortho_penalty_grad_", &ortho_penalty_grad_);
  m.impl("merge_into_", &merge_into_);
  m.impl("weight_stats", &weight_stats);
}
}  // namespace
}  // namespace soslora

TORCH_LIBRARY_IMPL(soslora, CPU, m) { soslora::register_kernels(m); }
TORCH_LIBRARY_IMPL(soslora, CUDA, m) { soslora::register_kernels(m); }

// The in-place ops update gradients and frozen weights, and the step's halves are the
// pieces of one node: they are not differentiable, so autograd passes through them instead
// of recording the ATen calls inside.
TORCH_LIBRARY_IMPL(soslora, Autograd, m) {
  m.impl("ortho_penalty_grad_", torch::CppFunction::makeFallthrough());
  m.impl("merge_into_", torch::CppFunction::makeFallthrough());
  m.impl("weight_stats", torch::CppFunction::makeFallthrough());
  m.impl("input_dropout_grads_", torch::CppFunction::makeFallthrough());
  // The halves of adapted_linear, whose autograd node (autograd.cpp) calls them.
  m.impl("adapted_linear_forward", torch::CppFunction::makeFallthrough());
  m.impl("adapted_linear_backward", torch::CppFunction::makeFallthrough());
  m.impl("dropout_seed", torch::CppFunction::makeFallthrough());
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "soslora_ext native library: registers the torch.ops.soslora operators";
  m.def(
      "set_cuda_path",
      [](const std::string& name) {
        if (name == "auto") soslora::set_cuda_path(soslora::CudaPath::kAuto);
        else if (name == "kernels") soslora::set_cuda_path(soslora::CudaPath::kKernels);
        else if (name == "aten") soslora::set_cuda_path(soslora::CudaPath::kAten);
        else throw pybind11::value_error("set_cuda_path: path must be 'auto', 'kernels' or "
                                         "'aten', got '" + name + "'");
      },
      "Chooses the CUDA implementation of the low-rank ops (see soslora.h: CudaPath).");
  m.def("cuda_path", [] {
    switch (soslora::cuda_path()) {
      case soslora::CudaPath::kKernels: return std::string("kernels");
      case soslora::CudaPath::kAten: return std::string("aten");
      default: return std::string("auto");
    }
  });
  m.def(
      "cuda_choices",
      [] {
        pybind11::dict out;
        for (const auto& [key, c] : soslora::measured_choices())
          out[pybind11::str(key)] = pybind11::make_tuple(
              c.impl == soslora::Impl::kKernel ? "kernels" : "aten", c.kernel_ms, c.library_ms);
        return out;
      },
      "The choices 'auto' measured: {shape class: (path, kernel ms, ATen ms)}.");
  m.def("clear_cuda_choices", &soslora::clear_measured_choices,
        "Forgets the measured choices (the next call of each shape class measures again).");
  m.def(
      "decide_for_tests",
      [](const std::string& key, bool capturing, const pybind11::function& time_ms) {
        const soslora::Impl impl =
            soslora::decide(key, capturing, [&](soslora::Impl i) {
              return time_ms(i == soslora::Impl::kKernel ? "kernels" : "aten").cast<double>();
            });
        return std::string(impl == soslora::Impl::kKernel ? "kernels" : "aten");
      },
      "Tests only: the 'auto' rule for a shape class key, as if the kernels served the "
      "device; time_ms(path) gives one timing.");
  m.def("set_cpu_takes_cuda_fallback", &soslora::set_cpu_takes_cuda_fallback,
        "Tests only: CPU tensors take the ATen paths that CUDA tensors take without the "
        "kernels (the dropout mask in ATen integer ops instead of the CPU loop).");
#ifdef SOSLORA_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
