// The step loops of seqtest.bptt's hand-written BPTT, issued from C++ (built by
// seqtest.native): the vanilla RNN's (ElementwiseRNN), the normalised RNN's, the GRU's and
// the normalised LSTM's.
//
// Each loop is a line-by-line translation of the Python loop it replaces in seqtest/bptt.py:
// the same ATen kernels, called in the same order on buffers laid out the same way, with four
// exceptions: tanh, the BN-LSTM's recurrent batch norms and, in float32, the GRU's and the
// normalised LSTMs' element-wise step work run our own kernels (below), and in float32 the
// larger recurrent products run on oneDNN's packed weights, not PyTorch's `mm`; all round
// differently from PyTorch's and are tested against float64 computations. With the tanh
// kernel swapped into the Python loops, the results of the vanilla RNNs, and of the GRU and
// LN-LSTM in float64, are bit-identical below the packed products' size (tests/test_native.py).
// What changes is the cost of
// issuing them: up to about 24 small kernels per time step, plus a Python object for every
// per-step view, which from Python cost more than the arithmetic at the sizes a testbed
// trains. Everything outside the loops (the input products, the weight gradients summed
// over all steps at once) stays in Python.
//
// Normalised LSTM and RNN: the per-step buffers and statistics stay in C++ (a Tape, an
// RNNTape) between the two passes. A normalisation arrives as the tuple (is_layer_norm,
// weight, bias or None, eps, momentum, running means [L, F] or None, running variances or
// None); batch norm's statistics of step t move row min(t, L - 1) of the running estimates
// (seqtest.models.StepBatchNorm).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

using at::Tensor;
using Tensors = std::vector<Tensor>;

namespace {

// ---------------------------------------------------------------- tanh

// tanh in our own kernel. PyTorch's CPU tanh computes one number at a time (2.1 ns per
// float32 on a 2-core AVX-512 machine at every ATEN_CPU_CAPABILITY, against 0.21 ns for its
// vectorised sigmoid), and a tanh RNN's forward loop spent about 45% of its time in it. This
// kernel is plain arithmetic the compiler vectorises: 0.3-0.4 ns per number there with
// AVX-512, within 1.35 ulp of the exact tanh over every float tried (PyTorch's: 0.51 ulp;
// glibc allows itself 2), checked against float64 in tests/test_native.py:
//
//   |x| < 0.625: the odd Taylor series x (1 - x^2/3 + 2x^4/15 - ...) to the x^19 term
//                (the first term left out is below 1e-8 of the sum there);
//   otherwise:   1 - 2 / (exp(2|x|) + 1), exp(y) = 2^k exp(r) with k = round(y / ln 2),
//                r = y - k ln 2 (ln 2 in two parts) and exp(r) by its Taylor series to r^7;
//                |x| is clamped at 10, where tanh is 1 in float32;
//
// with x's sign (tanh(-0) = -0) and NaN passed through. It pays only where the compiler can
// vectorise it with wide registers: built for the baseline x86-64 instructions alone it was
// not vectorised and took 46 us at [64, 128], against PyTorch's 18 us and 3.2 us with
// AVX-512. So GCC on x86-64 builds it for AVX-512 and for AVX2 with FMA, the processor's
// features choose one when first used, and everywhere else (other processors, other
// compilers, x86-64 without AVX2) PyTorch's tanh runs (`tanh_kernel_name` says which).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SEQTEST_TANH_KERNELS 1
#endif

using TanhKernel = void (*)(float*, const float*, int64_t);

#ifdef SEQTEST_TANH_KERNELS
// exp(y) for -88 <= y <= 20 (tanh_of's and sigmoid_of's arguments): 2^k exp(r) with
// k = round(y / ln 2), r = y - k ln 2 (ln 2 in two parts) and exp(r) by its Taylor series
// to r^7, 2^k from its exponent bits: -127 <= k <= 29, and 2^-127 reads as 0, so that
// exp(y) is 0 below about -87.7 (under the smallest normal float, 1.2e-38, from -87.3).
__attribute__((always_inline)) inline float exp_of(float y) {
  const float round = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float k = (y * 1.44269504088896341f + round) - round;
  const float r = (y - k * 0.693359375f) + k * 2.12194440e-4f;  // ln 2 = 0.693359375 - ...
  float e = 1.0f / 5040.0f;
  e = e * r + 1.0f / 720.0f;
  e = e * r + 1.0f / 120.0f;
  e = e * r + 1.0f / 24.0f;
  e = e * r + 1.0f / 6.0f;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(k) + 127) << 23;
  float two_to_k;
  std::memcpy(&two_to_k, &exponent, sizeof two_to_k);
  return e * two_to_k;
}

__attribute__((always_inline)) inline float tanh_of(float x) {
  const float a = std::fabs(x);
  const float s = a * a;
  float p = -443861162.0f / 1856156927625.0f;
  p = p * s + 6404582.0f / 10854718875.0f;
  p = p * s - 929569.0f / 638512875.0f;
  p = p * s + 21844.0f / 6081075.0f;
  p = p * s - 1382.0f / 155925.0f;
  p = p * s + 62.0f / 2835.0f;
  p = p * s - 17.0f / 315.0f;
  p = p * s + 2.0f / 15.0f;
  p = p * s - 1.0f / 3.0f;
  const float near_zero = a + a * s * p;
  const float far = 1.0f - 2.0f / (exp_of(2.0f * (a > 10.0f ? 10.0f : a)) + 1.0f);
  const float t = std::copysign(a < 0.625f ? near_zero : far, x);
  return x == x ? t : x;  // (NaN passes the clamp: NaN > 10 is false)
}

// sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) below, e = exp(-|x|) (so that neither
// cancels); |x| clamped at 88, where sigmoid(-x) is 0 (below 1.2e-38 a run flushes it anyway).
__attribute__((always_inline)) inline float sigmoid_of(float x) {
  const float a = std::fabs(x);
  const float e = exp_of(-(a > 88.0f ? 88.0f : a));
  const float y = (x < 0.0f ? e : 1.0f) / (1.0f + e);
  return x == x ? y : x;
}

__attribute__((always_inline)) inline void tanh_loop(float* out, const float* in, int64_t n) {
#pragma GCC ivdep  // out may be in (in place): element i is read before it is written
  for (int64_t i = 0; i < n; ++i) out[i] = tanh_of(in[i]);
}

__attribute__((target("avx512f,avx2,fma"))) void tanh_avx512(float* out, const float* in,
                                                             int64_t n) {
  tanh_loop(out, in, n);
}

__attribute__((target("avx2,fma"))) void tanh_avx2(float* out, const float* in, int64_t n) {
  tanh_loop(out, in, n);
}

// sigmoid_of over an array, for tests (the GRU kernels below inline it).
__attribute__((target("avx512f,avx2,fma"))) void sigmoid_avx512(float* out, const float* in,
                                                                int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = sigmoid_of(in[i]);
}

__attribute__((target("avx2,fma"))) void sigmoid_avx2(float* out, const float* in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = sigmoid_of(in[i]);
}
#endif

// The kernel for this processor and its name, or null and "pytorch".
std::pair<TanhKernel, const char*> tanh_kernel() {
#ifdef SEQTEST_TANH_KERNELS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f")) return {tanh_avx512, "avx512"};
  if (avx2) return {tanh_avx2, "avx2"};
#endif
  return {nullptr, "pytorch"};
}

const std::pair<TanhKernel, const char*>& chosen_tanh_kernel() {
  static const std::pair<TanhKernel, const char*> chosen = tanh_kernel();
  return chosen;
}

// A kernel by name, for tests: "avx512" and "avx2" where this processor and build have them,
// "pytorch" (null: PyTorch's tanh).
TanhKernel tanh_kernel_named(const std::string& name) {
  if (name == "pytorch") return nullptr;
#ifdef SEQTEST_TANH_KERNELS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx2" && avx2) return tanh_avx2;
  if (name == "avx512" && avx2 && __builtin_cpu_supports("avx512f")) return tanh_avx512;
#endif
  TORCH_CHECK(false, "tanh kernel ", name, " is not available here (allowed: avx512, avx2 "
              "where the processor and build have them, pytorch)");
}

// out = tanh(x), our kernel for float32 CPU matrices whose rows are contiguous (a step's
// [B, H] state or one gate's block of [B, G]) where this processor has one, PyTorch's for
// anything else. Rows are split over torch's threads in chunks of at least 32 K numbers
// (PyTorch's own grain).
void tanh_into(Tensor out, const Tensor& x,  // (a handle: writes reach the caller's)
               TanhKernel kernel = chosen_tanh_kernel().first) {
  if (!(kernel && x.is_cpu() && x.scalar_type() == at::kFloat &&
        out.scalar_type() == at::kFloat && x.dim() == 2 && out.sizes() == x.sizes() &&
        x.stride(1) == 1 && out.stride(1) == 1)) {
    at::tanh_out(out, x);
    return;
  }
  const int64_t cols = x.size(1), in_stride = x.stride(0), out_stride = out.stride(0);
  const float* in = x.const_data_ptr<float>();
  float* result = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, cols));
  at::parallel_for(0, x.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      kernel(result + r * out_stride, in + r * in_stride, cols);
    }
  });
}

// ---------------------------------------------------------------- fused element-wise steps

// A time step's element-wise work in one pass over each row, forward and backward, for the
// GRU and the normalised LSTMs: PyTorch's kernels take 5 calls per step for the GRU's
// forward and 10 for its backward (6 and 11 for the normalised LSTM's, around its two
// normalisations), each a few microseconds on a [B, H] step, and at the sizes a testbed
// trains those calls cost about as much as the step's matrix products
// (docs/performance.md). Built like the tanh kernel (for AVX-512 and for AVX2 with FMA,
// chosen by the processor) and for float32 CPU tensors only; elsewhere the loops call
// PyTorch's kernels as the Python loops do. The gates round differently from PyTorch's
// (sigmoid_of within 2.2 ulp of the exact sigmoid, tanh_of within 1.35), so the loops that
// use them agree with the Python loops to rounding (tests/test_native.py).

// One GRU step's rows: pointers to row 0 and row strides (in floats).
struct GruRows {
  float* gates;            // [B, 3H]: the input term in, (r, z, n) out
  float* recurrent;        // [B, 3H]: W_hh h_{t-1} + b_hh in; backward: its gradient out
  const float* h_prev;     // [B, H]: h_{t-1}
  float* h;                // [B, H]: forward: h_t out; backward: dL/dh_t in
  float* d_n;              // [B, H]: backward: dL/dn out
  const float* grad_prev;  // [B, H]: backward: dL/dh_{t-1} from the layer above, or null
  float* base;             // [B, H]: backward: dL/dh_t z + grad_prev out
  int64_t gates_stride, recurrent_stride, h_prev_stride, h_stride, d_n_stride;
  int64_t grad_prev_stride, base_stride, H;
};

// One normalised LSTM step's rows, each tensor contiguous ([B, 4H] or [B, H]).
struct LstmRows {
  const float* input = nullptr;      // z^x_t, the normalised input term
  const float* recurrent = nullptr;  // N_h(W_hh h_{t-1})
  float* gates = nullptr;            // (i, f, g, o) after their activations
  float* dz = nullptr;               // backward: dL/dz_t out
  const float* c_prev = nullptr;     // c_{t-1}
  float* c = nullptr;                // forward: c_t out
  const float* m = nullptr;          // forward: N_c(c_t)
  float* k = nullptr;                // tanh(N_c(c_t)): forward out, backward in
  float* h = nullptr;                // forward: h_t out; backward: dL/dh_t in
  float* d_m = nullptr;              // backward: dL/dN_c(c_t) out
  const float* d_c_norm = nullptr;   // backward: dL/dc_t through N_c
  float* dc = nullptr;               // backward: dL/dc_t from step t + 1 in, dL/dc_{t-1} out
  int64_t H = 0;
};

template <typename Rows>
using RowKernel = void (*)(const Rows&, int64_t, int64_t);

#ifdef SEQTEST_TANH_KERNELS
// GRU forward, rows [begin, end): r, z = sigmoid(x_{r,z} + W_h{r,z} h + b_h{r,z}),
// n = tanh(x_n + r (W_hn h + b_hn)), h_t = n + z (h_{t-1} - n).
__attribute__((always_inline)) inline void gru_forward_loop(const GruRows& s, int64_t begin,
                                                            int64_t end) {
  const int64_t H = s.H;
  for (int64_t row = begin; row < end; ++row) {
    // a pointer per gate's block: the blocks do not overlap, which lets GCC vectorise
    float* __restrict__ r_out = s.gates + row * s.gates_stride;
    float* __restrict__ z_out = r_out + H;
    float* __restrict__ n_out = r_out + 2 * H;
    const float* __restrict__ rec_r = s.recurrent + row * s.recurrent_stride;
    const float* __restrict__ rec_z = rec_r + H;
    const float* __restrict__ rec_n = rec_r + 2 * H;
    const float* __restrict__ h_prev = s.h_prev + row * s.h_prev_stride;
    float* __restrict__ h = s.h + row * s.h_stride;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float r = sigmoid_of(r_out[j] + rec_r[j]);
      const float z = sigmoid_of(z_out[j] + rec_z[j]);
      const float n = tanh_of(n_out[j] + r * rec_n[j]);
      r_out[j] = r;
      z_out[j] = z;
      n_out[j] = n;
      h[j] = n + z * (h_prev[j] - n);
    }
  }
}

// GRU backward, rows [begin, end), from dL/dh_t (`h`): writes dL/dn, the gradient of
// W_hh h_{t-1} + b_hh over it (r and z blocks: also the input term's; n block: dL/dn * r)
// and, with grad_prev, base = dL/dh_t z + grad_prev (the caller adds the product with W_hh).
template <bool kPrevious>
__attribute__((always_inline)) inline void gru_backward_loop(const GruRows& s, int64_t begin,
                                                             int64_t end) {
  const int64_t H = s.H;
  for (int64_t row = begin; row < end; ++row) {
    const float* __restrict__ r = s.gates + row * s.gates_stride;
    const float* __restrict__ z = r + H;
    const float* __restrict__ n = r + 2 * H;
    float* __restrict__ d_r = s.recurrent + row * s.recurrent_stride;
    float* __restrict__ d_z = d_r + H;
    float* __restrict__ d_hn = d_r + 2 * H;  // in: W_hn h_{t-1} + b_hn
    const float* __restrict__ h_prev = s.h_prev + row * s.h_prev_stride;
    const float* __restrict__ dh = s.h + row * s.h_stride;
    float* __restrict__ d_n = s.d_n + row * s.d_n_stride;
    const float* __restrict__ grad_prev = s.grad_prev + row * s.grad_prev_stride;
    float* __restrict__ base = s.base + row * s.base_stride;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float through_z = dh[j] * z[j];
      const float dn = (dh[j] - through_z) * (1.0f - n[j] * n[j]);
      d_n[j] = dn;
      d_r[j] = dn * d_hn[j] * (r[j] * (1.0f - r[j]));
      d_z[j] = dh[j] * (h_prev[j] - n[j]) * (z[j] * (1.0f - z[j]));
      d_hn[j] = dn * r[j];
      if (kPrevious) base[j] = through_z + grad_prev[j];
    }
  }
}

__attribute__((always_inline)) inline void gru_backward_rows(const GruRows& s, int64_t begin,
                                                             int64_t end) {
  gru_backward_loop<true>(s, begin, end);
}

__attribute__((always_inline)) inline void gru_backward_first_rows(const GruRows& s,
                                                                   int64_t begin, int64_t end) {
  gru_backward_loop<false>(s, begin, end);  // step 0: no h_{t-1} to pass a gradient to
}

// Normalised LSTM forward, the cell, rows [begin, end): with z_t = z^x_t + N_h(W_hh h_{t-1}),
// i, f, o = sigmoid(z_t's blocks), g = tanh(z_t's g block), c_t = f c_{t-1} + i g.
__attribute__((always_inline)) inline void lstm_cell_loop(const LstmRows& s, int64_t begin,
                                                          int64_t end) {
  const int64_t H = s.H;
  for (int64_t row = begin; row < end; ++row) {
    const float* __restrict__ x_i = s.input + row * 4 * H;
    const float* __restrict__ x_f = x_i + H;
    const float* __restrict__ x_g = x_i + 2 * H;
    const float* __restrict__ x_o = x_i + 3 * H;
    const float* __restrict__ a_i = s.recurrent + row * 4 * H;
    const float* __restrict__ a_f = a_i + H;
    const float* __restrict__ a_g = a_i + 2 * H;
    const float* __restrict__ a_o = a_i + 3 * H;
    float* __restrict__ i_out = s.gates + row * 4 * H;
    float* __restrict__ f_out = i_out + H;
    float* __restrict__ g_out = i_out + 2 * H;
    float* __restrict__ o_out = i_out + 3 * H;
    const float* __restrict__ c_prev = s.c_prev + row * H;
    float* __restrict__ c = s.c + row * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid_of(x_i[j] + a_i[j]);
      const float f = sigmoid_of(x_f[j] + a_f[j]);
      const float g = tanh_of(x_g[j] + a_g[j]);
      i_out[j] = i;
      f_out[j] = f;
      g_out[j] = g;
      o_out[j] = sigmoid_of(x_o[j] + a_o[j]);
      c[j] = f * c_prev[j] + i * g;
    }
  }
}

// Normalised LSTM forward, the output, rows [begin, end): k = tanh(N_c(c_t)), h_t = o k.
__attribute__((always_inline)) inline void lstm_output_loop(const LstmRows& s, int64_t begin,
                                                            int64_t end) {
  const int64_t H = s.H;
  for (int64_t row = begin; row < end; ++row) {
    const float* __restrict__ o = s.gates + row * 4 * H + 3 * H;
    const float* __restrict__ m = s.m + row * H;
    float* __restrict__ k = s.k + row * H;
    float* __restrict__ h = s.h + row * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float value = tanh_of(m[j]);
      k[j] = value;
      h[j] = o[j] * value;
    }
  }
}

// Normalised LSTM backward, the output, rows [begin, end), from dL/dh_t (`h`):
// dL/dN_c(c_t) = dL/dh_t o (1 - k^2) and dL/dz_t's o block = dL/dh_t k o (1 - o).
__attribute__((always_inline)) inline void lstm_output_grad_loop(const LstmRows& s,
                                                                 int64_t begin, int64_t end) {
  const int64_t H = s.H;
  for (int64_t row = begin; row < end; ++row) {
    const float* __restrict__ o = s.gates + row * 4 * H + 3 * H;
    const float* __restrict__ k = s.k + row * H;
    const float* __restrict__ dh = s.h + row * H;
    float* __restrict__ d_m = s.d_m + row * H;
    float* __restrict__ dz_o = s.dz + row * 4 * H + 3 * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      d_m[j] = dh[j] * o[j] * (1.0f - k[j] * k[j]);
      dz_o[j] = dh[j] * k[j] * (o[j] * (1.0f - o[j]));
    }
  }
}

// Normalised LSTM backward, the cell, rows [begin, end): with dL/dc_t = dc + d_c_norm,
// dL/dz_t's i, f, g blocks (through sigmoid', sigmoid', tanh') and dc = dL/dc_t f.
__attribute__((always_inline)) inline void lstm_cell_grad_loop(const LstmRows& s,
                                                               int64_t begin, int64_t end) {
  const int64_t H = s.H;
  for (int64_t row = begin; row < end; ++row) {
    const float* __restrict__ i = s.gates + row * 4 * H;
    const float* __restrict__ f = i + H;
    const float* __restrict__ g = i + 2 * H;
    float* __restrict__ dz_i = s.dz + row * 4 * H;
    float* __restrict__ dz_f = dz_i + H;
    float* __restrict__ dz_g = dz_i + 2 * H;
    const float* __restrict__ c_prev = s.c_prev + row * H;
    const float* __restrict__ d_c_norm = s.d_c_norm + row * H;
    float* __restrict__ dc = s.dc + row * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float d_c = dc[j] + d_c_norm[j];
      dz_i[j] = d_c * g[j] * (i[j] * (1.0f - i[j]));
      dz_f[j] = d_c * c_prev[j] * (f[j] * (1.0f - f[j]));
      dz_g[j] = d_c * i[j] * (1.0f - g[j] * g[j]);
      dc[j] = d_c * f[j];
    }
  }
}

// Each loop built for AVX-512 (name_avx512) and for AVX2 with FMA (name_avx2).
#define SEQTEST_ISA_BUILDS(Rows, name)                                                      \
  __attribute__((target("avx512f,avx2,fma"))) void name##_avx512(const Rows& s, int64_t b,  \
                                                                 int64_t e) {               \
    name(s, b, e);                                                                          \
  }                                                                                         \
  __attribute__((target("avx2,fma"))) void name##_avx2(const Rows& s, int64_t b, int64_t e) { \
    name(s, b, e);                                                                          \
  }
SEQTEST_ISA_BUILDS(GruRows, gru_forward_loop)
SEQTEST_ISA_BUILDS(GruRows, gru_backward_rows)
SEQTEST_ISA_BUILDS(GruRows, gru_backward_first_rows)
SEQTEST_ISA_BUILDS(LstmRows, lstm_cell_loop)
SEQTEST_ISA_BUILDS(LstmRows, lstm_output_loop)
SEQTEST_ISA_BUILDS(LstmRows, lstm_output_grad_loop)
SEQTEST_ISA_BUILDS(LstmRows, lstm_cell_grad_loop)
#undef SEQTEST_ISA_BUILDS
#endif

// The fused kernels for this processor (the tanh kernel's choice), all null where it has none.
struct StepKernels {
  RowKernel<GruRows> gru_forward = nullptr, gru_backward = nullptr, gru_backward_first = nullptr;
  RowKernel<LstmRows> lstm_cell = nullptr, lstm_output = nullptr, lstm_output_grad = nullptr,
                      lstm_cell_grad = nullptr;
};

const StepKernels& step_kernels() {
  static const StepKernels chosen = [] {
    StepKernels k;
#ifdef SEQTEST_TANH_KERNELS
#define SEQTEST_ISA(isa)                                                                   \
  k = {gru_forward_loop_##isa, gru_backward_rows_##isa, gru_backward_first_rows_##isa,     \
       lstm_cell_loop_##isa,   lstm_output_loop_##isa,  lstm_output_grad_loop_##isa,       \
       lstm_cell_grad_loop_##isa}
    const TanhKernel tanh = chosen_tanh_kernel().first;
    if (tanh == tanh_avx512) SEQTEST_ISA(avx512);
    if (tanh == tanh_avx2) SEQTEST_ISA(avx2);
#undef SEQTEST_ISA
#endif
    return k;
  }();
  return chosen;
}

// Whether the fused kernels run on a step of this tensor's kind: float32 on the CPU, here.
bool fused_steps(const Tensor& like) {
  return step_kernels().gru_forward && like.is_cpu() && like.scalar_type() == at::kFloat;
}

// `kernel` over a step's B rows, split over torch's threads in chunks of at least 32 K
// numbers of the widest [B, width] operand (the tanh kernel's grain).
template <typename Rows>
void run_rows(RowKernel<Rows> kernel, const Rows& rows, int64_t B, int64_t width) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, width));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { kernel(rows, begin, end); });
}

bool rows_contiguous(std::initializer_list<const Tensor*> tensors) {
  return std::all_of(tensors.begin(), tensors.end(),
                     [](const Tensor* t) { return t->dim() == 2 && t->stride(1) == 1; });
}

bool all_contiguous(std::initializer_list<const Tensor*> tensors) {
  return std::all_of(tensors.begin(), tensors.end(),
                     [](const Tensor* t) { return t->dim() == 2 && t->is_contiguous(); });
}

// ---------------------------------------------------------------- recurrent products

// x W' for a weight W [out, in] that oneDNN packed once for the whole sequence
// (seqtest.bptt.packed_weight; PyTorch's `mkldnn::_reorder_linear_weight`), through
// PyTorch's `mkldnn::_linear_pointwise`. The per-step products of a recurrence reuse one
// weight T times, and on the 2-core AMD EPYC machine PyTorch's matrix product (MKL) ran
// them at about half the speed of oneDNN's kernel on the packed weight from
// [64, 128] x [128, 384] on (docs/performance.md); below that its fixed cost loses.
Tensor packed_linear(const Tensor& x, const Tensor& packed) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, packed, c10::optional<Tensor>(), std::string("none"),
                                 c10::List<c10::optional<at::Scalar>>(),
                                 c10::optional<std::string>()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

using Packed = c10::optional<Tensor>;  // a weight packed by oneDNN, or none: PyTorch's mm

// out = x W' (+ base): on the packed weight where there is one, else by PyTorch's `mm` /
// `addmm` with w_t = W'; base broadcasts (a bias) or has out's shape.
void product_into(Tensor out, const Tensor& x, const Tensor& w_t, const Packed& packed,
                  const c10::optional<Tensor>& base = c10::nullopt) {
  if (packed.has_value()) {
    const Tensor product = packed_linear(x, *packed);
    base.has_value() ? at::add_out(out, *base, product) : out.copy_(product);
  } else {
    base.has_value() ? at::addmm_out(out, *base, x, w_t) : at::mm_out(out, x, w_t);
  }
}

// base + x W, a new tensor: the backward pass's dL/dh_{t-1}, W = W_hh and packed = W_hh'
// packed (or none).
Tensor plus_product(const Tensor& base, const Tensor& x, const Tensor& w, const Packed& packed) {
  return packed.has_value() ? packed_linear(x, *packed).add_(base) : at::addmm(base, x, w);
}

// ---------------------------------------------------------------- batch norm of one step

// Batch norm of one [B, F] time step, in our own kernel. PyTorch's CPU batch norm is written
// for images ([N, C, H, W]); on a BN-LSTM's steps its setup costs as much as its arithmetic,
// and the recurrent normalisations call it, forward and backward, twice per time step.
// Measured on 2 cores, forward and backward together, against PyTorch's: 0.44-0.48x at
// [64, 128] and [32, 256], 0.69-0.85x at [64, 512], 0.77-0.86x at [128, 256]
// (docs/performance.md).
//
// The same arithmetic as PyTorch's: statistics over the batch, the biased variance in the
// normalisation and the unbiased one in the running estimate. The sums run in the input's
// precision; every result stays within 1e-5 of its scale in float32 against a float64
// computation (tests/test_native.py). Float and double tensors on the CPU, contiguous, at
// most 64 K numbers unless torch runs on one thread; anything else goes to PyTorch's
// kernel, which splits the features over threads: at [128, 1024] on 2 threads it was 1.5x
// faster.

bool own_batch_norm(const Tensor& x, const Tensor& weight) {
  return x.is_cpu() && x.dim() == 2 && x.is_contiguous() && x.size(0) > 1 &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         weight.scalar_type() == x.scalar_type() &&
         (x.numel() <= (1 << 16) || at::get_num_threads() == 1);
}

// The forward pass over plain pointers marked unaliased, so that the compiler vectorises the
// loops over features; `scale` has room for F numbers, `bias` may be null.
template <typename T>
void batch_norm_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                               T* __restrict__ mean, T* __restrict__ rstd,
                               T* __restrict__ running_mean,
                               T* __restrict__ running_var, const T* __restrict__ weight,
                               const T* __restrict__ bias, T* __restrict__ scale, int64_t B,
                               int64_t F, T momentum, T eps) {
  // One pass for both sums, of d = x - x_0 (x_0 the first sample): shifted by a value from
  // within the data's spread, the variance E[d^2] - E[d]^2 does not suffer the cancellation
  // of E[x^2] - E[x]^2 when the mean is large against the spread.
  const T n = static_cast<T>(B);
  T* __restrict__ sum = scale;  // the shifted sums, then the scales
  T* __restrict__ squares = rstd;  // the sums of squares, then the inverse std
  for (int64_t f = 0; f < F; ++f) sum[f] = 0, squares[f] = 0;
  for (int64_t r = 1; r < B; ++r) {
    const T* __restrict__ row = x + r * F;
    for (int64_t f = 0; f < F; ++f) {
      const T d = row[f] - x[f];
      sum[f] += d;
      squares[f] += d * d;
    }
  }
  for (int64_t f = 0; f < F; ++f) {
    const T shift = sum[f] / n;
    const T centred = std::max(T(0), squares[f] - shift * sum[f]);  // sum of (x - mean)^2
    mean[f] = x[f] + shift;
    rstd[f] = 1 / std::sqrt(centred / n + eps);
    scale[f] = rstd[f] * weight[f];
    running_mean[f] += momentum * (mean[f] - running_mean[f]);
    running_var[f] += momentum * (centred / (n - 1) - running_var[f]);
  }
  for (int64_t r = 0; r < B; ++r) {
    const T* __restrict__ row = x + r * F;
    T* __restrict__ out = y + r * F;
    if (bias) {
      for (int64_t f = 0; f < F; ++f) out[f] = (row[f] - mean[f]) * scale[f] + bias[f];
    } else {
      for (int64_t f = 0; f < F; ++f) out[f] = (row[f] - mean[f]) * scale[f];
    }
  }
}

// The backward pass; `scratch` has room for 3 F numbers. With x^ = (x - mean) rstd:
// dL/dx = w rstd (dL/dy - mean_b(dL/dy) - x^ mean_b(dL/dy x^)), dL/dw = sum_b dL/dy x^,
// dL/db = sum_b dL/dy.
template <typename T>
void batch_norm_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                T* __restrict__ dx, const T* __restrict__ mean,
                                const T* __restrict__ rstd, const T* __restrict__ weight,
                                T* __restrict__ d_weight, T* __restrict__ d_bias,
                                T* __restrict__ scratch, int64_t B, int64_t F) {
  const T n = static_cast<T>(B);
  for (int64_t f = 0; f < F; ++f) d_bias[f] = 0, d_weight[f] = 0;
  for (int64_t r = 0; r < B; ++r) {  // d_weight holds the sums of dL/dy (x - mean) for now
    const T* __restrict__ row = x + r * F;
    const T* __restrict__ row_grad = grad + r * F;
    for (int64_t f = 0; f < F; ++f) {
      d_bias[f] += row_grad[f];
      d_weight[f] += row_grad[f] * (row[f] - mean[f]);
    }
  }
  // dL/dx = a dL/dy + c (x - mean) + e, per feature
  T* __restrict__ a = scratch;
  T* __restrict__ c = a + F;
  T* __restrict__ e = c + F;
  for (int64_t f = 0; f < F; ++f) {
    a[f] = rstd[f] * weight[f];
    c[f] = -a[f] * rstd[f] * rstd[f] * d_weight[f] / n;
    e[f] = -a[f] * d_bias[f] / n;
    d_weight[f] *= rstd[f];
  }
  for (int64_t r = 0; r < B; ++r) {
    const T* __restrict__ row = x + r * F;
    const T* __restrict__ row_grad = grad + r * F;
    T* __restrict__ out = dx + r * F;
    for (int64_t f = 0; f < F; ++f) {
      out[f] = a[f] * row_grad[f] + c[f] * (row[f] - mean[f]) + e[f];
    }
  }
}

// (y, batch mean, inverse std): y = (x - mean) rstd w + b; running estimates moved in place.
std::tuple<Tensor, Tensor, Tensor> batch_norm_forward(const Tensor& x, const Tensor& weight,
                                                      const c10::optional<Tensor>& bias,
                                                      const Tensor& running_mean,
                                                      const Tensor& running_var,
                                                      double momentum, double eps) {
  if (!own_batch_norm(x, weight) || !running_mean.is_contiguous() ||
      !running_var.is_contiguous()) {
    return at::native_batch_norm(x, weight, bias, running_mean, running_var, true, momentum,
                                 eps);
  }
  const int64_t B = x.size(0), F = x.size(1);
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({F}, x.options()), rstd = at::empty({F}, x.options());
  const Tensor w = weight.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqtest_batch_norm_forward", [&] {
    std::vector<scalar_t> scale(F);
    batch_norm_forward_kernel<scalar_t>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<scalar_t>(),
        running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
        w.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
        scale.data(), B, F, static_cast<scalar_t>(momentum), static_cast<scalar_t>(eps));
  });
  return {y, mean, rstd};
}

// (dL/dx, dL/dw, dL/db) of `batch_norm_forward` given dL/dy (dL/db undefined without bias).
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad, const Tensor& x,
                                                       const Tensor& weight,
                                                       const Tensor& mean, const Tensor& rstd,
                                                       double eps, bool with_bias) {
  const Tensor dy = grad.contiguous();
  if (!own_batch_norm(x, weight) || dy.scalar_type() != x.scalar_type()) {
    return at::native_batch_norm_backward(dy, x, weight, {}, {}, mean, rstd, true, eps,
                                          {true, true, with_bias});
  }
  const int64_t B = x.size(0), F = x.size(1);
  Tensor dx = at::empty_like(x);
  Tensor d_weight = at::empty({F}, x.options()), d_bias = at::empty({F}, x.options());
  const Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqtest_batch_norm_backward", [&] {
    std::vector<scalar_t> scratch(3 * F);
    batch_norm_backward_kernel<scalar_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
        rstd.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        d_weight.mutable_data_ptr<scalar_t>(), d_bias.mutable_data_ptr<scalar_t>(),
        scratch.data(), B, F);
  });
  return {dx, d_weight, with_bias ? d_bias : Tensor()};
}

// ---------------------------------------------------------------- normalised LSTM

struct Normalisation {
  bool layer;
  Tensor weight;
  c10::optional<Tensor> bias;
  double eps;
  double momentum;
  c10::optional<Tensor> running_mean;
  c10::optional<Tensor> running_var;

  // (normalised x, mean, inverse std) of step t
  std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x, int64_t t) const {
    if (layer) return at::native_layer_norm(x, weight.sizes(), weight, bias, eps);
    const int64_t slot = std::min(t, running_mean->size(0) - 1);
    return batch_norm_forward(x, weight, bias, running_mean->select(0, slot),
                              running_var->select(0, slot), momentum, eps);
  }

  // dL/dx of one step; adds the step's d weight and d bias to `grads` (set at the first)
  Tensor backward(const Tensor& grad, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                  Tensors& grads) const {
    const std::array<bool, 3> mask{true, true, bias.has_value()};
    Tensor d_x, d_weight, d_bias;
    if (layer) {
      std::tie(d_x, d_weight, d_bias) = at::native_layer_norm_backward(
          grad, x, weight.sizes(), mean, rstd, weight, bias, mask);
    } else {
      std::tie(d_x, d_weight, d_bias) =
          batch_norm_backward(grad, x, weight, mean, rstd, eps, bias.has_value());
    }
    if (!bias.has_value()) d_bias = Tensor();  // (CUDA's batch-norm backward returns one)
    if (grads.empty()) {
      grads = {d_weight, d_bias};
    } else {
      grads[0].add_(d_weight);
      if (d_bias.defined()) grads[1].add_(d_bias);
    }
    return d_x;
  }
};

Normalisation unpack(const py::tuple& n) {
  return {n[0].cast<bool>(),   n[1].cast<Tensor>(), n[2].cast<c10::optional<Tensor>>(),
          n[3].cast<double>(), n[4].cast<double>(), n[5].cast<c10::optional<Tensor>>(),
          n[6].cast<c10::optional<Tensor>>()};
}

// The per-step views of blocks [n, ...] laid end to end (seqtest.bptt.unbind_steps).
Tensors steps_of(const Tensors& blocks) {
  Tensors views;
  for (const Tensor& block : blocks) {
    for (Tensor& view : block.unbind(0)) views.push_back(std::move(view));
  }
  return views;
}

// `steps` uninitialised [rows, cols] tensors as views into blocks of at most `block_bytes`
// (seqtest.bptt.step_buffers: the same layout).
Tensors step_buffers(const Tensor& like, int64_t steps, int64_t rows, int64_t cols,
                     int64_t block_bytes) {
  const int64_t per_step = static_cast<int64_t>(like.element_size()) * rows * cols;
  const int64_t per_block = std::max<int64_t>(1, block_bytes / per_step);
  Tensors blocks;
  for (int64_t start = 0; start < steps; start += per_block) {
    blocks.push_back(at::empty({std::min(per_block, steps - start), rows, cols}, like.options()));
  }
  return steps_of(blocks);
}

// The (i, f, g, o) blocks of a [B, 4H] tensor, as views.
std::array<Tensor, 4> gate_blocks(const Tensor& gates) {
  const int64_t H = gates.size(1) / 4;
  return {gates.narrow(1, 0, H), gates.narrow(1, H, H), gates.narrow(1, 2 * H, H),
          gates.narrow(1, 3 * H, H)};
}

// What the backward pass reads, per step.
struct Tape {
  Tensors a;    // W_hh h_{t-1}
  Tensors act;  // i, f, g, o after their activations
  Tensors c;    // c_{t-1} at t (c_0 = 0)
  Tensors k;    // tanh(N_c(c_t))
  Tensors h;    // h_{t-1} at t (h_0 = 0)
  Tensors mean_h, rstd_h, mean_c, rstd_c;  // the normalisations' statistics
};

// Normalised input term [T, B, 4H] -> (hidden states [B, T, H], the tape).
std::tuple<Tensor, Tape> forward(const Tensor& inputs, const Tensor& w_hh,
                                 const Normalisation& norm_h, const Normalisation& norm_c,
                                 int64_t block_bytes, const Packed& packed_w_hh) {
  // the caller runs with autograd off; skipping its dispatch keys saves their overhead too
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = inputs.size(0), B = inputs.size(1), G = inputs.size(2), H = G / 4;
  const Tensor w_hh_t = w_hh.t().contiguous();
  Tape tape{step_buffers(inputs, T, B, G, block_bytes), step_buffers(inputs, T, B, G, block_bytes),
            step_buffers(inputs, T + 1, B, H, block_bytes),
            step_buffers(inputs, T, B, H, block_bytes),
            step_buffers(inputs, T + 1, B, H, block_bytes)};
  tape.c[0].zero_();
  tape.h[0].zero_();
  const Tensors step_in = inputs.unbind(0);
  Tensor z = at::empty({B, G}, inputs.options());  // z_t = z^x_t + N_h(a_t)
  Tensor z_g = gate_blocks(z)[2];
  const bool fused = fused_steps(inputs);
  for (int64_t t = 0; t < T; ++t) {
    Tensor a = tape.a[t];
    product_into(a, tape.h[t], w_hh_t, packed_w_hh);
    auto [n, mean_h, rstd_h] = norm_h.forward(a, t);
    tape.mean_h.push_back(mean_h);
    tape.rstd_h.push_back(rstd_h);
    if (fused && all_contiguous({&step_in[t], &n, &tape.act[t], &tape.c[t], &tape.c[t + 1]})) {
      LstmRows rows;
      rows.input = step_in[t].const_data_ptr<float>();
      rows.recurrent = n.const_data_ptr<float>();
      rows.gates = tape.act[t].data_ptr<float>();
      rows.c_prev = tape.c[t].const_data_ptr<float>();
      rows.c = tape.c[t + 1].data_ptr<float>();
      rows.H = H;
      run_rows(step_kernels().lstm_cell, rows, B, G);
      auto [m, mean_c, rstd_c] = norm_c.forward(tape.c[t + 1], t);
      tape.mean_c.push_back(mean_c);
      tape.rstd_c.push_back(rstd_c);
      const Tensor m_rows = m.contiguous();
      rows.m = m_rows.const_data_ptr<float>();
      rows.k = tape.k[t].data_ptr<float>();
      rows.h = tape.h[t + 1].data_ptr<float>();
      run_rows(step_kernels().lstm_output, rows, B, H);
      continue;
    }
    at::add_out(z, step_in[t], n);
    auto [i, f, g, o] = gate_blocks(tape.act[t]);
    at::sigmoid_out(tape.act[t], z);
    tanh_into(g, z_g);
    Tensor c = at::mul_out(tape.c[t + 1], f, tape.c[t]);
    c.addcmul_(i, g);
    auto [m, mean_c, rstd_c] = norm_c.forward(c, t);
    tape.mean_c.push_back(mean_c);
    tape.rstd_c.push_back(rstd_c);
    Tensor& k = tape.k[t];
    tanh_into(k, m);
    at::mul_out(tape.h[t + 1], o, k);
  }
  Tensor hidden = at::stack(at::TensorList(tape.h).slice(1), 1);
  return {hidden, std::move(tape)};
}

// Writes dL/dz_t into `d_inputs` [T, B, 4H]; returns (dL/dW_hh, N_h's d weight and d bias,
// N_c's d weight and d bias), a missing bias's gradient undefined (None).
Tensors backward(const Tape& tape, const Tensor& grad_hidden, const Tensor& d_inputs,
                 const Tensor& w_hh, const Normalisation& norm_h, const Normalisation& norm_c,
                 const Packed& packed_w_hh_t) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = d_inputs.size(0);
  const Tensors step_grad = grad_hidden.unbind(1);
  Tensors step_dz = d_inputs.unbind(0);
  Tensor d_act = at::empty_like(step_dz[0]);  // dL/d(i, f, g, o) of the current step
  auto [d_i, d_f, d_g, d_o] = gate_blocks(d_act);
  Tensor d_w_hh = at::zeros_like(w_hh);
  Tensors grads_h, grads_c;  // (d weight, d bias), summed over the steps
  Tensor dh = step_grad[T - 1].contiguous();
  Tensor dc = at::zeros_like(tape.c[0]);
  const bool fused = fused_steps(d_inputs) && dc.is_contiguous();
  Tensor d_m_rows = fused ? at::empty_like(dc) : Tensor();  // dL/dN_c(c_t) of the step
  for (int64_t t = T - 1; t >= 0; --t) {
    const Tensor& k = tape.k[t];
    Tensor& dz = step_dz[t];
    if (fused && all_contiguous({&dz, &dh, &tape.act[t], &k, &tape.c[t]})) {
      LstmRows rows;
      rows.gates = tape.act[t].data_ptr<float>();
      rows.k = tape.k[t].data_ptr<float>();
      rows.h = dh.data_ptr<float>();
      rows.d_m = d_m_rows.data_ptr<float>();
      rows.dz = dz.data_ptr<float>();
      rows.H = dc.size(1);
      const int64_t B = dc.size(0);
      run_rows(step_kernels().lstm_output_grad, rows, B, rows.H);
      const Tensor d_c_norm =
          norm_c.backward(d_m_rows, tape.c[t + 1], tape.mean_c[t], tape.rstd_c[t], grads_c)
              .contiguous();
      rows.d_c_norm = d_c_norm.const_data_ptr<float>();
      rows.c_prev = tape.c[t].const_data_ptr<float>();
      rows.dc = dc.data_ptr<float>();
      run_rows(step_kernels().lstm_cell_grad, rows, B, 4 * rows.H);
    } else {
      auto [i, f, g, o] = gate_blocks(tape.act[t]);
      at::mul_out(d_o, dh, k);
      Tensor d_m = at::tanh_backward(dh * o, k);  // dL/dN_c(c_t)
      dc.add_(norm_c.backward(d_m, tape.c[t + 1], tape.mean_c[t], tape.rstd_c[t], grads_c));
      at::mul_out(d_i, dc, g);
      at::mul_out(d_f, dc, tape.c[t]);
      at::mul_out(d_g, dc, i);
      dc.mul_(f);
      // sigmoid' for every block, then tanh' over the g block
      at::sigmoid_backward_out(dz, d_act, tape.act[t]);
      Tensor dz_g = gate_blocks(dz)[2];
      at::tanh_backward_out(dz_g, d_g, g);
    }
    Tensor da = norm_h.backward(dz, tape.a[t], tape.mean_h[t], tape.rstd_h[t], grads_h);
    if (t > 0) {  // h_0 = 0: step 0 adds nothing to W_hh's gradient and has no h before
      d_w_hh.addmm_(da.t(), tape.h[t]);
      dh = plus_product(step_grad[t - 1], da, w_hh, packed_w_hh_t);
    }
  }
  return {d_w_hh, grads_h[0], grads_h[1], grads_c[0], grads_c[1]};
}

// ---------------------------------------------------------------- vanilla RNN

// h_t = f(inputs_t + W_hh h_{t-1}) in place, f by name (seqtest.bptt.RNN_ACTIVATIONS).
void activate_(Tensor& p, const std::string& activation, double slope) {
  if (activation == "tanh") {
    tanh_into(p, p);
  } else if (activation == "sigmoid") {
    p.sigmoid_();
  } else if (activation == "relu") {
    p.relu_();
  } else if (activation == "leaky_relu") {
    at::leaky_relu_(p, slope);
  } else if (activation == "elu") {
    at::elu_(p);
  } else {
    TORCH_CHECK(false, "no compiled loop for the activation ", activation);
  }
}

// out = grad * f'(p), from f's output y = f(p) (seqtest.bptt._derivative)
void derivative(Tensor& out, const Tensor& grad, const Tensor& y, const std::string& activation,
                double slope) {
  if (activation == "tanh") {
    at::tanh_backward_out(out, grad, y);
  } else if (activation == "sigmoid") {
    at::sigmoid_backward_out(out, grad, y);
  } else if (activation == "relu") {
    at::threshold_backward_out(out, grad, y, 0);
  } else if (activation == "leaky_relu") {
    at::leaky_relu_backward_out(out, grad, y, slope, true);
  } else if (activation == "elu") {
    at::elu_backward_out(out, grad, 1.0, 1.0, 1.0, true, y);
  } else {
    TORCH_CHECK(false, "no compiled loop for the activation ", activation);
  }
}

// ElementwiseRNN.forward's loop: h_t into the hidden blocks (h_{t-1} at step t, h_0 = 0 set)
// from the input term's blocks; with prelu's slopes, p_t is written over the input term.
void rnn_forward(const Tensors& input_blocks, const Tensors& hidden_blocks,
                 const Tensor& w_hh_t, const std::string& activation, double slope,
                 const c10::optional<Tensor>& prelu_weight, const Packed& packed_w_hh) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensors inputs = steps_of(input_blocks), hidden = steps_of(hidden_blocks);
  const int64_t T = static_cast<int64_t>(inputs.size());
  for (int64_t t = 0; t < T; ++t) {
    Tensor h = hidden[t + 1];
    if (prelu_weight.has_value()) {
      Tensor p = inputs[t];  // the pre-activation, kept over the input term
      product_into(p, hidden[t], w_hh_t, packed_w_hh, p);
      h.copy_(at::_prelu_kernel(p, *prelu_weight));
    } else {
      product_into(h, hidden[t], w_hh_t, packed_w_hh, inputs[t]);
      activate_(h, activation, slope);
    }
  }
}

// ElementwiseRNN._backward_steps: fills the d_pre blocks; returns dL/dW_hh and the prelu
// slopes' gradient (undefined without: None), reading p_t from `pre_blocks` for prelu.
Tensors rnn_backward(const Tensor& grad_hidden, const Tensors& hidden_blocks,
                     const Tensors& d_pre_blocks, const Tensor& w_hh,
                     const std::string& activation, double slope, const Tensors& pre_blocks,
                     const c10::optional<Tensor>& prelu_weight, const Packed& packed_w_hh_t) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensors hidden = steps_of(hidden_blocks), d_pre = steps_of(d_pre_blocks);
  const Tensors pre = steps_of(pre_blocks);
  const int64_t T = static_cast<int64_t>(d_pre.size());
  Tensor d_w_hh = at::zeros_like(w_hh);
  Tensor d_slopes = prelu_weight.has_value() ? at::zeros_like(hidden[0]) : Tensor();
  Tensor dh = grad_hidden.select(0, T - 1).clone();
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor dp = d_pre[t];
    if (prelu_weight.has_value()) {
      auto [d_input, d_slope] = at::_prelu_kernel_backward(dh, pre[t], *prelu_weight);
      dp.copy_(d_input);
      d_slopes.add_(d_slope);
    } else {
      derivative(dp, dh, hidden[t + 1], activation, slope);
    }
    if (t > 0) {  // h_0 = 0: step 0 adds nothing to W_hh's gradient
      d_w_hh.addmm_(dp.t(), hidden[t]);
      dh = plus_product(grad_hidden.select(0, t - 1), dp, w_hh, packed_w_hh_t);
    }
  }
  return {d_w_hh, d_slopes.defined() ? d_slopes.sum(0) : Tensor()};
}

// ---------------------------------------------------------------- normalised vanilla RNN

// What NormalisedRNN's backward pass reads, per step.
struct RNNTape {
  Tensors a;           // what the normalisation read: z^x_t + W_hh h_{t-1} (LN), W_hh h_{t-1} (BN)
  Tensors h;           // h_0 .. h_T (h_0 = 0)
  Tensors pre;         // prelu: the pre-activations (none for the other activations)
  Tensors mean, rstd;  // the normalisation's statistics
};

// NormalisedRNN._forward_steps: input term [T, B, H] -> (hidden states [B, T, H], the tape).
std::tuple<Tensor, RNNTape> norm_rnn_forward(const Tensor& inputs, const Tensor& w_hh,
                                             const Normalisation& norm,
                                             const std::string& activation, double slope,
                                             const c10::optional<Tensor>& prelu_weight,
                                             int64_t block_bytes, const Packed& packed_w_hh) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = inputs.size(0), B = inputs.size(1), H = inputs.size(2);
  const Tensor w_hh_t = w_hh.t().contiguous();
  RNNTape tape{step_buffers(inputs, T, B, H, block_bytes)};
  const bool inside = norm.layer;  // layer norm normalises the sum with the input term
  Tensor h = at::zeros({B, H}, inputs.options());
  tape.h.push_back(h);
  const Tensors step_in = inputs.unbind(0);
  for (int64_t t = 0; t < T; ++t) {
    Tensor a = tape.a[t];
    product_into(a, h, w_hh_t, packed_w_hh,
                 inside ? c10::optional<Tensor>(step_in[t]) : c10::nullopt);
    auto [n, mean, rstd] = norm.forward(a, t);
    if (!inside) n.add_(step_in[t]);
    if (prelu_weight.has_value()) {
      tape.pre.push_back(n);
      h = at::_prelu_kernel(n, *prelu_weight);
    } else {
      activate_(n, activation, slope);
      h = n;
    }
    tape.h.push_back(h);
    tape.mean.push_back(mean);
    tape.rstd.push_back(rstd);
  }
  Tensor hidden = at::stack(at::TensorList(tape.h).slice(1), 1);
  return {hidden, std::move(tape)};
}

// NormalisedRNN._backward_steps: writes dL/dz^x_t into `d_inputs` [T, B, H]; returns
// (dL/dW_hh, the prelu slopes' gradient, the normalisation's d weight and d bias), a
// missing one undefined.
Tensors norm_rnn_backward(const RNNTape& tape, const Tensor& grad_hidden,
                          const Tensor& d_inputs, const Tensor& w_hh, const Normalisation& norm,
                          const std::string& activation, double slope,
                          const c10::optional<Tensor>& prelu_weight,
                          const Packed& packed_w_hh_t) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = d_inputs.size(0);
  const bool inside = norm.layer;
  const Tensors step_grad = grad_hidden.unbind(1);
  Tensors step_dz = d_inputs.unbind(0);
  Tensor d_w_hh = at::zeros_like(w_hh);
  Tensor d_slopes = prelu_weight.has_value() ? at::zeros_like(tape.h[0]) : Tensor();
  Tensors grads;  // (d weight, d bias), summed over the steps
  Tensor dh = step_grad[T - 1];
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor& dz = step_dz[t];  // batch norm: dL/d(pre-activation) is dL/dz^x_t already
    if (prelu_weight.has_value()) {
      auto [d_pre, d_slope] = at::_prelu_kernel_backward(dh, tape.pre[t], *prelu_weight);
      dz.copy_(d_pre);
      d_slopes.add_(d_slope);
    } else {
      derivative(dz, dh, tape.h[t + 1], activation, slope);
    }
    Tensor da = norm.backward(dz, tape.a[t], tape.mean[t], tape.rstd[t], grads);
    if (inside) dz.copy_(da);
    if (t > 0) {  // h_0 = 0: step 0 adds nothing to W_hh's gradient and has no h before
      d_w_hh.addmm_(da.t(), tape.h[t]);
      dh = plus_product(step_grad[t - 1], da, w_hh, packed_w_hh_t);
    }
  }
  return {d_w_hh, d_slopes.defined() ? d_slopes.sum(0) : Tensor(), grads[0], grads[1]};
}

// ---------------------------------------------------------------- GRU

// GRU.forward's loop: turns the input term's blocks into (r, z, n) in place, writes
// W_hh h_{t-1} + b_hh into the recurrent blocks and h_t into the hidden blocks.
void gru_forward(const Tensors& gate_blocks_in, const Tensors& recurrent_blocks,
                 const Tensors& hidden_blocks, const Tensor& w_hh_t, const Tensor& b_hh,
                 const c10::optional<Tensor>& packed_w_hh) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensors gates = steps_of(gate_blocks_in), recurrent = steps_of(recurrent_blocks);
  const Tensors hidden = steps_of(hidden_blocks);
  const int64_t T = static_cast<int64_t>(gates.size()), H = hidden[0].size(1);
  const bool fused = fused_steps(gates[0]);
  for (int64_t t = 0; t < T; ++t) {
    Tensor rec = recurrent[t];
    product_into(rec, hidden[t], w_hh_t, packed_w_hh, b_hh);
    Tensor act = gates[t];
    Tensor h = hidden[t + 1];
    if (fused && rows_contiguous({&act, &rec, &hidden[t], &h})) {
      GruRows rows{};
      rows.gates = act.data_ptr<float>();
      rows.recurrent = rec.data_ptr<float>();
      rows.h_prev = hidden[t].const_data_ptr<float>();
      rows.h = h.data_ptr<float>();
      rows.gates_stride = act.stride(0), rows.recurrent_stride = rec.stride(0);
      rows.h_prev_stride = hidden[t].stride(0), rows.h_stride = h.stride(0), rows.H = H;
      run_rows(step_kernels().gru_forward, rows, act.size(0), 3 * H);
      continue;
    }
    act.narrow(1, 0, 2 * H).add_(rec.narrow(1, 0, 2 * H)).sigmoid_();
    Tensor r = act.narrow(1, 0, H), z = act.narrow(1, H, H), n = act.narrow(1, 2 * H, H);
    n.addcmul_(r, rec.narrow(1, 2 * H, H));
    tanh_into(n, n);
    at::lerp_out(h, n, hidden[t], z);
  }
}

// GRU.backward's loop: writes dL/d(W_hh h_{t-1} + b_hh) over the recurrent blocks (each
// step's slot after its last read) and dL/dn into the d_n blocks.
void gru_backward(const Tensor& grad_hidden_in, const Tensors& gate_blocks_in,
                  const Tensors& recurrent_blocks, const Tensors& d_n_blocks,
                  const Tensors& hidden_blocks, const Tensor& w_hh,
                  const c10::optional<Tensor>& packed_w_hh_t) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensors gates = steps_of(gate_blocks_in), recurrent = steps_of(recurrent_blocks);
  const Tensors d_n_all = steps_of(d_n_blocks), hidden = steps_of(hidden_blocks);
  const int64_t T = static_cast<int64_t>(gates.size()), H = hidden[0].size(1);
  if (fused_steps(gates[0])) {
    // (an incoming gradient may be a broadcast view: a loss on the last step alone)
    const Tensor grad_hidden =
        grad_hidden_in.stride(2) == 1 ? grad_hidden_in : grad_hidden_in.contiguous();
    const int64_t B = gates[0].size(0);
    const std::array<Tensor, 2> bases = {at::empty({B, H}, gates[0].options()),
                                         at::empty({B, H}, gates[0].options())};
    Tensor dh = grad_hidden.select(0, T - 1);
    for (int64_t t = T - 1; t >= 0; --t) {
      const Tensor& base = bases[t % 2];  // dh is the other one (or the incoming gradient)
      const Tensor grad_prev = t > 0 ? grad_hidden.select(0, t - 1) : base;
      GruRows rows{};
      rows.gates = gates[t].data_ptr<float>();
      rows.recurrent = recurrent[t].data_ptr<float>();
      rows.h_prev = hidden[t].const_data_ptr<float>();
      rows.h = dh.data_ptr<float>();
      rows.d_n = d_n_all[t].data_ptr<float>();
      rows.grad_prev = grad_prev.const_data_ptr<float>();
      rows.base = base.data_ptr<float>();
      rows.gates_stride = gates[t].stride(0), rows.recurrent_stride = recurrent[t].stride(0);
      rows.h_prev_stride = hidden[t].stride(0), rows.h_stride = dh.stride(0);
      rows.d_n_stride = d_n_all[t].stride(0), rows.grad_prev_stride = grad_prev.stride(0);
      rows.base_stride = base.stride(0), rows.H = H;
      const StepKernels& kernels = step_kernels();
      run_rows(t > 0 ? kernels.gru_backward : kernels.gru_backward_first, rows, B, 3 * H);
      if (t > 0) {
        dh = packed_w_hh_t.has_value() ? plus_product(base, recurrent[t], w_hh, packed_w_hh_t)
                                       : base.addmm_(recurrent[t], w_hh);
      }
    }
    return;
  }
  const Tensor& grad_hidden = grad_hidden_in;
  Tensor dh = grad_hidden.select(0, T - 1).clone();
  for (int64_t t = T - 1; t >= 0; --t) {
    const Tensor& act = gates[t];
    Tensor r = act.narrow(1, 0, H), z = act.narrow(1, H, H), n = act.narrow(1, 2 * H, H);
    const Tensor& d = recurrent[t];
    Tensor d_r = d.narrow(1, 0, H), d_z = d.narrow(1, H, H), d_hn = d.narrow(1, 2 * H, H);
    Tensor through_z = dh * z;  // the direct path to h_{t-1}
    Tensor d_n = d_n_all[t];
    at::tanh_backward_out(d_n, dh - through_z, n);
    Tensor d_r_out = d_n * d_hn;  // (d_hn still holds W_hn h_{t-1} + b_hn here)
    at::mul_out(d_hn, d_n, r);
    at::sigmoid_backward_out(d_r, d_r_out, r);
    at::sigmoid_backward_out(d_z, dh * (hidden[t] - n), z);
    if (t > 0) {
      dh = plus_product(through_z, d, w_hh, packed_w_hh_t).add_(grad_hidden.select(0, t - 1));
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_norm_forward", &batch_norm_forward,
        "Training-mode batch norm of one [B, F] step: (y, mean, inverse std)");
  m.def("batch_norm_backward", &batch_norm_backward, "(dL/dx, dL/dw, dL/db) of it");
  m.def("own_batch_norm", &own_batch_norm, "Whether those run our kernel (else PyTorch's)");
  m.def(
      "tanh",
      [](const Tensor& x, const std::string& kernel) {
        Tensor out = at::empty_like(x);
        tanh_into(out, x, kernel.empty() ? chosen_tanh_kernel().first : tanh_kernel_named(kernel));
        return out;
      },
      "tanh(x) by the loops' kernel (float32 matrices with contiguous rows; else PyTorch's), or "
      "by the one named (avx512, avx2, pytorch)",
      py::arg("x"), py::arg("kernel") = "");
  m.def(
      "sigmoid",
      [](const Tensor& x, const std::string& kernel) {
        TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
                    "sigmoid: a contiguous float32 CPU tensor");
        const TanhKernel tanh = tanh_kernel_named(kernel);  // (checks the name)
        TanhKernel sigmoid = nullptr;
#ifdef SEQTEST_TANH_KERNELS
        sigmoid = tanh == tanh_avx512 ? sigmoid_avx512 : tanh == tanh_avx2 ? sigmoid_avx2 : nullptr;
#endif
        if (!sigmoid) return at::sigmoid(x);
        Tensor out = at::empty_like(x);
        sigmoid(out.data_ptr<float>(), x.const_data_ptr<float>(), x.numel());
        return out;
      },
      "sigmoid(x) by the GRU kernels' sigmoid for the kernel named (avx512, avx2; pytorch: "
      "PyTorch's), for tests",
      py::arg("x"), py::arg("kernel"));
  m.def("packed_linear", &packed_linear,
        "x W' on a weight packed by oneDNN, as the loops compute it (for tests)");
  m.def(
      "tanh_kernel_name", [] { return std::string(chosen_tanh_kernel().second); },
      "Which tanh the loops run on this processor: avx512, avx2 or pytorch");
  m.def("rnn_forward", &rnn_forward, "ElementwiseRNN.forward's loop (over blocks of steps)");
  m.def("rnn_backward", &rnn_backward,
        "ElementwiseRNN.backward's loop; returns dL/dW_hh and the prelu slopes' gradient");
  py::class_<RNNTape>(m, "RNNTape", "What the normalised RNN's backward pass reads");
  m.def(
      "norm_rnn_forward",
      [](const Tensor& inputs, const Tensor& w_hh, const py::tuple& norm,
         const std::string& activation, double slope, const c10::optional<Tensor>& prelu_weight,
         int64_t block_bytes, const Packed& packed_w_hh) {
        return norm_rnn_forward(inputs, w_hh, unpack(norm), activation, slope, prelu_weight,
                                block_bytes, packed_w_hh);
      },
      "Normalised RNN: input term [T, B, H] -> (hidden states [B, T, H], tape)");
  m.def(
      "norm_rnn_backward",
      [](const RNNTape& tape, const Tensor& grad_hidden, const Tensor& d_inputs,
         const Tensor& w_hh, const py::tuple& norm, const std::string& activation,
         double slope, const c10::optional<Tensor>& prelu_weight, const Packed& packed_w_hh_t) {
        return norm_rnn_backward(tape, grad_hidden, d_inputs, w_hh, unpack(norm), activation,
                                 slope, prelu_weight, packed_w_hh_t);
      },
      "Writes dL/dz^x_t into d_inputs; returns dW_hh, the prelu slopes' gradient and the "
      "normalisation's d weight, d bias");
  m.def("gru_forward", &gru_forward, "GRU.forward's loop");
  m.def("gru_backward", &gru_backward, "GRU.backward's loop");
  py::class_<Tape>(m, "Tape", "The per-step buffers and statistics the backward pass reads");
  m.def(
      "forward",
      [](const Tensor& inputs, const Tensor& w_hh, const py::tuple& norm_h,
         const py::tuple& norm_c, int64_t block_bytes, const Packed& packed_w_hh) {
        return forward(inputs, w_hh, unpack(norm_h), unpack(norm_c), block_bytes, packed_w_hh);
      },
      "Normalised LSTM: normalised input term [T, B, 4H] -> (hidden states [B, T, H], tape)");
  m.def(
      "backward",
      [](const Tape& tape, const Tensor& grad_hidden, const Tensor& d_inputs,
         const Tensor& w_hh, const py::tuple& norm_h, const py::tuple& norm_c,
         const Packed& packed_w_hh_t) {
        return backward(tape, grad_hidden, d_inputs, w_hh, unpack(norm_h), unpack(norm_c),
                        packed_w_hh_t);
      },
      "Writes dL/dz_t into d_inputs; returns dW_hh and the normalisations' d weight, d bias");
}
