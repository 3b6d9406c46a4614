// The step loops of seqtest.bptt.NormalisedLSTM, issued from C++ (built by seqtest.native).
//
// Each function is a line-by-line translation of the Python loop it replaces
// (NormalisedLSTM._forward_steps and ._backward_steps in seqtest/bptt.py): the same ATen
// kernels, called in the same order on the same buffers, so the results are bit-identical.
// What changes is the cost of issuing them: about 24 small kernels per time step, which
// from Python cost more than their arithmetic at the sizes a testbed trains.
//
// The buffers come from Python (seqtest.bptt.step_buffers), one view per step, so that the
// memory layout is decided in one place. A normalisation arrives as
// (is_layer_norm, weight, bias or None, eps, momentum, running means, running variances);
// batch norm's running estimates are one view per kept step (the last shared by the rest).

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <tuple>
#include <vector>

using at::Tensor;
using Tensors = std::vector<Tensor>;

namespace {

struct Normalisation {
  bool layer;
  Tensor weight;
  c10::optional<Tensor> bias;
  double eps;
  double momentum;
  Tensors means;  // batch norm: running mean of each kept step
  Tensors vars;

  // (normalised x, mean, inverse std) of step t
  std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x, int64_t t) const {
    if (layer) return at::native_layer_norm(x, weight.sizes(), weight, bias, eps);
    const int64_t last = static_cast<int64_t>(means.size()) - 1;
    const int64_t slot = t < last ? t : last;
    return at::native_batch_norm(x, weight, bias, means[slot], vars[slot], true, momentum, eps);
  }

  // dL/dx of one step; adds the step's d weight and d bias to `grads` (created at the first)
  Tensor backward(const Tensor& grad, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                  Tensors& grads) const {
    const std::array<bool, 3> mask{true, true, bias.has_value()};
    Tensor d_x, d_weight, d_bias;
    if (layer) {
      std::tie(d_x, d_weight, d_bias) = at::native_layer_norm_backward(
          grad, x, weight.sizes(), mean, rstd, weight, bias, mask);
    } else {
      std::tie(d_x, d_weight, d_bias) = at::native_batch_norm_backward(
          grad, x, weight, {}, {}, mean, rstd, true, eps, mask);
    }
    if (grads.empty()) {
      grads = {d_weight, d_bias};
    } else {
      grads[0].add_(d_weight);
      if (d_bias.defined()) grads[1].add_(d_bias);
    }
    return d_x;
  }
};

// The (i, f, g, o) blocks of a [B, 4H] tensor, as views.
std::array<Tensor, 4> gate_blocks(const Tensor& gates) {
  const int64_t H = gates.size(1) / 4;
  return {gates.narrow(1, 0, H), gates.narrow(1, H, H), gates.narrow(1, 2 * H, H),
          gates.narrow(1, 3 * H, H)};
}

// The forward loop: fills the step buffers; returns the statistics of N_h and N_c at every
// step as four lists (mean_h, rstd_h, mean_c, rstd_c).
std::vector<Tensors> forward_steps(
    const Tensors& step_in, const Tensor& w_hh_t, Tensors& step_a, Tensors& step_act,
    Tensors& step_c, Tensors& step_k, Tensors& step_h, const Normalisation& norm_h,
    const Normalisation& norm_c) {
  // the caller runs with autograd off; skipping its dispatch keys saves their overhead too
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = static_cast<int64_t>(step_in.size());
  Tensor z = at::empty_like(step_in[0]);  // z_t = z^x_t + N_h(a_t)
  Tensor z_g = gate_blocks(z)[2];
  std::vector<Tensors> stats(4);
  for (int64_t t = 0; t < T; ++t) {
    Tensor a = at::mm_out(step_a[t], step_h[t], w_hh_t);
    auto [n, mean_h, rstd_h] = norm_h.forward(a, t);
    stats[0].push_back(mean_h);
    stats[1].push_back(rstd_h);
    at::add_out(z, step_in[t], n);
    auto [i, f, g, o] = gate_blocks(step_act[t]);
    at::sigmoid_out(step_act[t], z);
    at::tanh_out(g, z_g);
    Tensor c = at::mul_out(step_c[t + 1], f, step_c[t]);
    c.addcmul_(i, g);
    auto [m, mean_c, rstd_c] = norm_c.forward(c, t);
    stats[2].push_back(mean_c);
    stats[3].push_back(rstd_c);
    Tensor k = at::tanh_out(step_k[t], m);
    at::mul_out(step_h[t + 1], o, k);
  }
  return stats;
}

// The backward loop: writes dL/dz_t into step_dz; returns (dL/dW_hh, N_h's d weight and
// d bias, N_c's d weight and d bias), a missing bias's gradient undefined (None).
Tensors backward_steps(
    const Tensors& step_grad, Tensors& step_dz, const Tensor& w_hh, const Tensors& step_a,
    const Tensors& step_act, const Tensors& step_c, const Tensors& step_k,
    const Tensors& step_h, const std::vector<Tensors>& stats, const Normalisation& norm_h,
    const Normalisation& norm_c) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = static_cast<int64_t>(step_dz.size());
  Tensor d_act = at::empty_like(step_dz[0]);  // dL/d(i, f, g, o) of the current step
  auto [d_i, d_f, d_g, d_o] = gate_blocks(d_act);
  Tensor d_w_hh = at::zeros_like(w_hh);
  Tensors grads_h, grads_c;  // (d weight, d bias), summed over the steps
  Tensor dh = step_grad[T - 1].clone();
  Tensor dc = at::zeros_like(step_c[0]);
  for (int64_t t = T - 1; t >= 0; --t) {
    const Tensor& k = step_k[t];
    Tensor& dz = step_dz[t];
    auto [i, f, g, o] = gate_blocks(step_act[t]);
    at::mul_out(d_o, dh, k);
    Tensor d_m = at::tanh_backward(dh * o, k);  // dL/dN_c(c_t)
    dc.add_(norm_c.backward(d_m, step_c[t + 1], stats[2][t], stats[3][t], grads_c));
    at::mul_out(d_i, dc, g);
    at::mul_out(d_f, dc, step_c[t]);
    at::mul_out(d_g, dc, i);
    dc.mul_(f);
    // sigmoid' for every block, then tanh' over the g block
    at::sigmoid_backward_out(dz, d_act, step_act[t]);
    Tensor dz_g = gate_blocks(dz)[2];
    at::tanh_backward_out(dz_g, d_g, g);
    Tensor da = norm_h.backward(dz, step_a[t], stats[0][t], stats[1][t], grads_h);
    if (t > 0) {  // h_0 = 0: step 0 adds nothing to W_hh's gradient and has no h before
      d_w_hh.addmm_(da.t(), step_h[t]);
      dh = at::addmm(step_grad[t - 1], da, w_hh);
    }
  }
  return {d_w_hh, grads_h[0], grads_h[1], grads_c[0], grads_c[1]};
}

Normalisation unpack(const py::tuple& n) {
  return {n[0].cast<bool>(),    n[1].cast<Tensor>(),  n[2].cast<c10::optional<Tensor>>(),
          n[3].cast<double>(),  n[4].cast<double>(),  n[5].cast<Tensors>(),
          n[6].cast<Tensors>()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "forward_steps",
      [](const Tensors& step_in, const Tensor& w_hh_t, Tensors step_a, Tensors step_act,
         Tensors step_c, Tensors step_k, Tensors step_h, const py::tuple& norm_h,
         const py::tuple& norm_c) {
        return forward_steps(step_in, w_hh_t, step_a, step_act, step_c, step_k, step_h,
                             unpack(norm_h), unpack(norm_c));
      },
      "The normalised LSTM's forward loop (seqtest.bptt.NormalisedLSTM._forward_steps)");
  m.def(
      "backward_steps",
      [](const Tensors& step_grad, Tensors step_dz, const Tensor& w_hh,
         const Tensors& step_a, const Tensors& step_act, const Tensors& step_c,
         const Tensors& step_k, const Tensors& step_h, const std::vector<Tensors>& stats,
         const py::tuple& norm_h, const py::tuple& norm_c) {
        return backward_steps(step_grad, step_dz, w_hh, step_a, step_act, step_c, step_k,
                              step_h, stats, unpack(norm_h), unpack(norm_c));
      },
      "The normalised LSTM's backward loop (seqtest.bptt.NormalisedLSTM._backward_steps)");
}
