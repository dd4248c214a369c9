// The schemas of every moefast op, in one place. Device kernels register against these with
// TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp, csrc/cuda/*.cu); fake kernels and autograd live in
// moefast/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(moefast, m) {
  // logits [T, E] -> weights [T, k] (dtype of logits), expert_ids [T, k] int32.
  m.def("router(Tensor logits, int k, str mode, bool normalize) -> (Tensor, Tensor)");
  // grad_weights [T, k], logits [T, E], expert_ids [T, k] -> grad_logits [T, E].
  m.def(
      "router_backward(Tensor grad_weights, Tensor logits, Tensor expert_ids, str mode, "
      "bool normalize) -> Tensor");
  // expert_ids [T, k] int32 -> counts [E], offs [E], position [T, k], order [T * k], all int32.
  m.def("routing_plan(Tensor expert_ids, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  // x [T, d] -> [T * k, d]: out[position[t, j]] = weights[t, j] * x[t] (weight 1 if None).
  m.def("permute(Tensor x, Tensor position, Tensor? weights) -> Tensor");
  // y [T * k, d] -> [T, d]: out[t] = sum_j weights[t, j] * y[position[t, j]] (weight 1 if None).
  m.def("unpermute(Tensor y, Tensor position, Tensor? weights) -> Tensor");
  // grad_out [T, d], y [T * k, d] -> [T, k] in the accumulation dtype (float32, or float64).
  m.def("unpermute_weight_grad(Tensor grad_out, Tensor y, Tensor position) -> Tensor");
  // a [N, K], b [E, K, M], offs [E] int32 cumulative row ends, bias [E, M] -> [N, M].
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offs, Tensor? bias=None) -> Tensor");
  // grouped_mm followed by an activation (none, relu, gelu, silu; swiglu halves M: [gate | up] ->
  // silu(gate) * up), fused into the GEMM epilogue on CUDA.
  m.def("grouped_mm_act(Tensor a, Tensor b, Tensor offs, Tensor? bias, str activation) -> Tensor");
  // h [..., 2H] = [gate | up] -> silu(gate) * up [..., H].
  m.def("swiglu(Tensor h) -> Tensor");
  // grad_out [..., H], h [..., 2H] -> grad_h [..., 2H] (both halves, in h's layout).
  m.def("swiglu_backward(Tensor grad_out, Tensor h) -> Tensor");
  // The SwiGLU expert MLP per group: x [N, d], w1 [E, d, 2H], b1 [E, 2H], w2 [E, H, d], b2 [E, d],
  // offs [E] -> y [N, d] = swiglu(x_e w1_e + b1_e) w2_e + b2_e, with h [N, 2H] (the [gate | up]
  // pre-activation) and act [N, H] (the SwiGLU output) for the backward. On the CPU it reorders
  // grouped_mm -> swiglu -> grouped_mm expert by expert; on CUDA it is that composition.
  m.def(
      "grouped_swiglu_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor offs) -> "
      "(Tensor, Tensor, Tensor)");
  // -> grad_x [N, d] ([0, d] unless input_grad), grad_w1, grad_w2, grad_b1 [E, 2H] and
  // grad_b2 [E, d] ([0, ...] unless bias).
  m.def(
      "grouped_swiglu_mlp_backward(Tensor grad_y, Tensor x, Tensor w1, Tensor w2, Tensor offs, "
      "Tensor h, Tensor act, bool input_grad, bool bias) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // a [N, K], grad_out [N, M], offs [E] -> grad_b [E, K, M] = a_e^T @ grad_out_e per group.
  m.def("grouped_mm_weight_grad(Tensor a, Tensor grad_out, Tensor offs) -> Tensor");
  // grad_out [N, M], offs [E] -> grad_bias [E, M], the sum of each group's rows.
  m.def("grouped_bias_grad(Tensor grad_out, Tensor offs) -> Tensor");
  // x [B, d], node_w [n, d], node_b [n], node_child [n, 2] int64 -> expert ids [B] int32: each row
  // walks a tree of hyperplanes from node 0, to node_child[m, <x, node_w[m]> > node_b[m]], until a
  // leaf -(e + 1) (at most depth levels); the hard MoE's "tree" gater.
  m.def(
      "tree_route(Tensor x, Tensor node_w, Tensor node_b, Tensor node_child, int depth) -> Tensor");
  // gate_logits [B, E], expert_out [E, B, C] -> [B, C].
  m.def("mixture(Tensor gate_logits, Tensor expert_out) -> Tensor");
  // grad_out [B, C] -> grad_gate_logits [B, E], grad_expert_out [E, B, C].
  m.def(
      "mixture_backward(Tensor grad_out, Tensor gate_logits, Tensor expert_out) -> "
      "(Tensor, Tensor)");
}
