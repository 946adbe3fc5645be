// Fused CPU decode steps: one token through a layer's recurrent state in a single pass over it.
//
// The reference steps (densessm/ops/retention/step.py, ops/scan/sequential.py) pass over the state once per
// operator: scale it, add the rank-1 update, read it out (retention), or form the decay, update and read out,
// then read the shallow layers' states again (the selective scan). Here each element of the state is read
// once and written once, and the small per-token work around it (DenseRetNet's gated k/v fusion, k/v norms,
// rotation, decay coefficients, head norm and output gate; DenseMamba's conv window, shallow read-outs, skip
// and gate) runs in the same calls instead of ~20 operator dispatches per layer.
//
// Arithmetic is in fp32 (fp64 for fp64 models); a bf16 retention state is read and rounded back per element.
// The state tensors are updated in place: the caller passes contiguous tensors it owns.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMinRows = 32;  // the fewest state rows a work item streams

// exp for x <= ~88, vectorisable (Cephes' polynomial, relative error ~1e-7; needs -fno-trapping-math, without
// which GCC keeps floor scalar); fp64 uses std::exp.
inline float exp_simd(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = r * r;
  const float y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                    1.6666665459e-1f) * r + 5.0000001201e-1f) * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}
inline double exp_simd(double x) { return std::exp(x); }

// bf16 <-> fp32 on the raw bits, as c10::BFloat16 converts (round to nearest even, NaN kept), but vectorisable
inline float bf16_value(uint16_t bits) { return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16); }
inline uint16_t bf16_bits(float value) {
  const uint32_t u = __builtin_bit_cast(uint32_t, value);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return value != value ? uint16_t(0x7FC0) : rounded;
}

// a value as the state's dtype stores it (bf16: rounded), back in the arithmetic's dtype
template <typename T, typename A>
inline A as_stored(A value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bf16_value(bf16_bits(value));
  } else {
    return value;
  }
}

template <typename T, typename A>
inline void store_row(T* out, const A* values, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) bits[i] = bf16_bits(values[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = T(values[i]);
  }
}

at::Tensor rows(const at::Tensor& t, int64_t batch, at::ScalarType acc) {
  return t.reshape({batch, -1}).to(acc).contiguous();
}

// A [batch, n] view of t's rows for reading: the rows of a split or chunk of a wider product stay where they
// are (a row stride, unit stride within), copied only when the dtype or the inner layout differs.
template <typename A>
struct RowView {
  at::Tensor held;
  const A* p = nullptr;
  int64_t stride = 0;
  const A* row(int64_t b) const { return p + b * stride; }
};

template <typename A>
RowView<A> row_view(const at::Tensor& t, int64_t batch) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  at::Tensor r = t.reshape({batch, -1});
  if (r.scalar_type() != acc || (r.size(1) > 1 && r.stride(1) != 1)) r = r.to(acc).contiguous();
  return {r, r.data_ptr<A>(), r.stride(0)};
}

template <typename A>
const A* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

// x <- rmsnorm(x) * w over n elements (as F.rms_norm: x * rsqrt(mean(x^2) + eps) * w)
// (the sum in vector lanes: a serial chain of dependent adds cost more than the rest of a dense layer's tail)
template <typename A>
inline void rms_norm(A* x, const A* w, int64_t n, double eps) {
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const A inv = A(1) / std::sqrt(sum / A(n) + A(eps));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * inv * w[i];
}

// ---- the dense gates' second layers -----------------------------------------------------------------------

// silu(hidden @ W^T) for a selective-transition gate's second layer W [n, r], packed in panels of kPanel output
// columns, [ceil(n / kPanel), r, kPanel] (densessm.inference.fusion.pack_gate_weight): each panel is one
// contiguous stretch the prefetcher streams, multiplied into a tile of rows held in registers. At decode batch
// sizes the weight arrives cold (the states flushed it) and the product has few inputs: the library's product
// of a transposed weight measured 151 us per call here, a packed oneDNN one 108 us for both gates of a
// DenseRetNet-350M layer (docs/benchmarks/dense_overhead_fused.md).
constexpr int64_t kPanel = 32;
#if defined(__AVX512F__)
constexpr int kTileRows = 6;  // 6 x 2 accumulator registers of 16 floats
#else
constexpr int kTileRows = 3;  // 3 x 4 of 8 floats
#endif

// a weight as the arithmetic reads it (bf16: its bits widened, as c10::BFloat16 converts)
template <typename A, typename W>
inline A load(W w) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    return bf16_value(w.x);
  } else {
    return A(w);
  }
}

template <int ROWS, typename W, typename A>
inline void gate_tile(const A* hidden, int64_t hidden_stride, const W* panel, int64_t r, A* out, int64_t out_stride,
                      int64_t width) {
  A acc[ROWS][kPanel] = {};
  for (int64_t i = 0; i < r; ++i) {
    A w[kPanel];
#pragma omp simd
    for (int64_t j = 0; j < kPanel; ++j) w[j] = load<A>(panel[i * kPanel + j]);
    for (int rr = 0; rr < ROWS; ++rr) {
      const A h = hidden[rr * hidden_stride + i];
#pragma omp simd
      for (int64_t j = 0; j < kPanel; ++j) acc[rr][j] += h * w[j];
    }
  }
  for (int rr = 0; rr < ROWS; ++rr) std::copy(acc[rr], acc[rr] + width, out + rr * out_stride);
}

template <int ROWS, typename W, typename A>
inline void gate_rows(const A* hidden, int64_t hidden_stride, int64_t rows, const W* panel, int64_t r, A* out,
                      int64_t out_stride, int64_t width) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return gate_tile<ROWS>(hidden, hidden_stride, panel, r, out, out_stride, width);
    gate_rows<ROWS - 1>(hidden, hidden_stride, rows, panel, r, out, out_stride, width);
  }
}

template <typename W, typename A>
void gate_panels(const A* hidden, int64_t hidden_stride, int64_t batch, const W* panels, int64_t r, int64_t n,
                 A* out) {
  const int64_t count = (n + kPanel - 1) / kPanel;
  at::parallel_for(0, count, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * kPanel, width = std::min(n, j0 + kPanel) - j0;
      for (int64_t b = 0; b < batch; b += kTileRows) {
        const int64_t rows = std::min<int64_t>(kTileRows, batch - b);
        gate_rows<kTileRows>(hidden + b * hidden_stride, hidden_stride, rows, panels + p * r * kPanel, r,
                             out + b * n + j0, n, width);
      }
    }
    // silu over the columns written, a plain loop per row (inside the tile's unrolled loop GCC kept it scalar)
    const int64_t j0 = p0 * kPanel, j1 = std::min(n, p1 * kPanel);
    for (int64_t b = 0; b < batch; ++b) {
      A* o = out + b * n;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) o[j] = o[j] / (A(1) + exp_simd(-o[j]));
    }
  });
}

// the gate [batch, n] in the arithmetic's dtype, from the hidden units in columns [offset, offset + r)
template <typename A>
at::Tensor silu_gate(const RowView<A>& hidden, int64_t offset, int64_t batch, const at::Tensor& panels_in, int64_t n,
                     const char* op) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  TORCH_CHECK(panels_in.dim() == 3 && panels_in.size(2) == kPanel && panels_in.size(0) == (n + kPanel - 1) / kPanel,
              op, ": a gate weight must be packed as [ceil(", n, " / ", kPanel, "), r, ", kPanel, "], got ",
              panels_in.sizes());
  const int64_t r = panels_in.size(1);
  TORCH_CHECK(hidden.held.size(1) >= offset + r, op, ": the gates' hidden units do not match their weights");
  const at::Tensor panels = panels_in.scalar_type() == at::kBFloat16 ? panels_in.contiguous()
                                                                      : panels_in.to(acc).contiguous();
  at::Tensor out = at::empty({batch, n}, hidden.held.options());
  if (panels.scalar_type() == at::kBFloat16) {
    gate_panels(hidden.p + offset, hidden.stride, batch, panels.data_ptr<c10::BFloat16>(), r, n, out.data_ptr<A>());
  } else {
    gate_panels(hidden.p + offset, hidden.stride, batch, panels.data_ptr<A>(), r, n, out.data_ptr<A>());
  }
  return out;
}

// ---- retention ------------------------------------------------------------------------------------------

template <typename S, typename A>
at::Tensor retention_step_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                               const at::Tensor& gate_in, at::TensorList k_shallow, at::TensorList v_shallow,
                               const c10::optional<at::Tensor>& gate_hidden_in,
                               const c10::optional<at::Tensor>& k_gate_weight_in,
                               const c10::optional<at::Tensor>& v_gate_weight_in,
                               const c10::optional<at::Tensor>& k_norm_in, const c10::optional<at::Tensor>& v_norm_in,
                               double kv_eps, const at::Tensor& sin_in, const at::Tensor& cos_in,
                               const at::Tensor& log_decay, at::Tensor& state, at::Tensor& scale,
                               const c10::optional<at::Tensor>& mask_in, const at::Tensor& head_norm_in,
                               double head_eps) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const int64_t B = state.size(0), H = state.size(1), Dk = state.size(2), Dv = state.size(3);
  const int64_t QK = H * Dk, V = H * Dv;
  const auto q = row_view<A>(q_in, B), k = row_view<A>(k_in, B), v = row_view<A>(v_in, B);
  const auto gate = row_view<A>(gate_in, B);
  TORCH_CHECK(q.held.size(1) == QK && k.held.size(1) == QK && v.held.size(1) == V && gate.held.size(1) == V,
              "retention_step: q, k, v or gate do not match the state's shape");
  const bool dense = !k_shallow.empty();
  TORCH_CHECK(k_shallow.size() == v_shallow.size(), "retention_step: as many shallow k as shallow v");
  const auto options = q.held.options();
  std::vector<RowView<A>> ks, vs;
  RowView<A> kg, vg;
  at::Tensor kw, vw;
  if (dense) {
    TORCH_CHECK(gate_hidden_in && k_gate_weight_in && v_gate_weight_in && k_norm_in && v_norm_in,
                "retention_step: dense inputs need the gates' hidden units and second layers, and the k/v norms");
    for (const auto& t : k_shallow) ks.push_back(row_view<A>(t, B));
    for (const auto& t : v_shallow) vs.push_back(row_view<A>(t, B));
    for (const auto& t : ks) TORCH_CHECK(t.held.size(1) == QK, "retention_step: a shallow k of another shape");
    for (const auto& t : vs) TORCH_CHECK(t.held.size(1) == V, "retention_step: a shallow v of another shape");
    const auto hidden = row_view<A>(*gate_hidden_in, B);
    kg = row_view<A>(silu_gate<A>(hidden, 0, B, *k_gate_weight_in, QK, "retention_step"), B);
    const int64_t k_units = k_gate_weight_in->size(1);
    vg = row_view<A>(silu_gate<A>(hidden, k_units, B, *v_gate_weight_in, V, "retention_step"), B);
    TORCH_CHECK(hidden.held.size(1) == k_units + v_gate_weight_in->size(1),
                "retention_step: the gates' hidden units do not match their weights");
    kw = k_norm_in->to(acc).contiguous();
    vw = v_norm_in->to(acc).contiguous();
  }
  at::Tensor sin_t = sin_in.reshape({-1, Dk}).to(acc).contiguous();
  at::Tensor cos_t = cos_in.reshape({-1, Dk}).to(acc).contiguous();
  TORCH_CHECK(sin_t.size(0) == 1 || sin_t.size(0) == B, "retention_step: rotation tables of another batch");
  const int64_t table_stride = sin_t.size(0) == 1 ? 0 : Dk;
  at::Tensor mask;
  if (mask_in) mask = mask_in->reshape({B}).to(at::kBool).contiguous();
  at::Tensor head_w = head_norm_in.to(acc).contiguous();
  TORCH_CHECK(scale.is_contiguous() && state.is_contiguous(), "retention_step: state and scale must be contiguous");
  at::Tensor decay = log_decay.to(scale.scalar_type()).exp().to(acc).contiguous();

  // per row: the token's k (kick = rotated k * fresh), q and v ready for the state pass; the scale advances
  at::Tensor kick = at::empty({B, QK}, options), qr = at::empty({B, QK}, options);
  at::Tensor vv = at::empty({B, V}, options), carry = at::empty({B, H}, options);
  A* kick_p = kick.data_ptr<A>();
  A* qr_p = qr.data_ptr<A>();
  A* vv_p = vv.data_ptr<A>();
  A* carry_p = carry.data_ptr<A>();
  const A *sin_p = sin_t.data_ptr<A>(), *cos_p = cos_t.data_ptr<A>(), *decay_p = decay.data_ptr<A>();
  const bool* mask_p = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const A *kw_p = opt_ptr<A>(kw), *vw_p = opt_ptr<A>(vw);
  // small and serial: one parallel region per call, since on a busy machine each region's barrier can wait
  // a scheduler slice for a descheduled thread
  auto scale_update = [&](auto* scale_p) {
    {
      std::vector<A> kf(QK);
      for (int64_t b = 0; b < B; ++b) {
        const bool real = mask_p == nullptr || mask_p[b];
        std::copy(k.row(b), k.row(b) + QK, kf.begin());
        A* vrow = vv_p + b * V;
        std::copy(v.row(b), v.row(b) + V, vrow);
        if (dense) {  // hidden fusion, oldest layer first, then the norms
          const A *kgb = kg.row(b), *vgb = vg.row(b);
          for (size_t i = 0; i < ks.size(); ++i) {
            const A *ksb = ks[i].row(b), *vsb = vs[i].row(b);
#pragma omp simd
            for (int64_t j = 0; j < QK; ++j) kf[j] = kf[j] + kgb[j] * ksb[j];
#pragma omp simd
            for (int64_t j = 0; j < V; ++j) vrow[j] = vrow[j] + vgb[j] * vsb[j];
          }
          rms_norm(kf.data(), kw_p, QK, kv_eps);
          rms_norm(vrow, vw_p, V, kv_eps);
        }
        const A* sn = sin_p + b * table_stride;
        const A* cs = cos_p + b * table_stride;
        for (int64_t h = 0; h < H; ++h) {
          auto* sc = scale_p + b * H + h;
          const A old = A(*sc);
          const A dec = real ? decay_p[h] : A(1);
          const A add = real ? A(1) : A(0);
          const A fresh_scale = old * dec + add;
          const A inv = A(1) / std::sqrt(std::max(fresh_scale, A(1e-30)));
          carry_p[b * H + h] = std::sqrt(old) * dec * inv;
          const A fresh = add * inv;
          *sc = fresh_scale;
          const A* qh = q.row(b) + h * Dk;
          const A* kh = kf.data() + h * Dk;
          A* kick_h = kick_p + b * QK + h * Dk;
          A* q_h = qr_p + b * QK + h * Dk;
          for (int64_t j = 0; j < Dk; j += 2) {  // rotate each pair: x cos + swap(x) signed_sin
            q_h[j] = qh[j] * cs[j] + qh[j + 1] * sn[j];
            q_h[j + 1] = qh[j + 1] * cs[j + 1] + qh[j] * sn[j + 1];
            const A k0 = kh[j] * cs[j] + kh[j + 1] * sn[j];
            const A k1 = kh[j + 1] * cs[j + 1] + kh[j] * sn[j + 1];
            kick_h[j] = real ? k0 * fresh : A(0);  // a padded token's k, v never reach the state, even as NaN
            kick_h[j + 1] = real ? k1 * fresh : A(0);
          }
        }
        if (!real) std::fill(vrow, vrow + V, A(0));
      }
    }
  };
  if (scale.scalar_type() == at::kDouble) {
    scale_update(scale.data_ptr<double>());
  } else {
    scale_update(scale.data_ptr<float>());
  }

  // the state pass: decay, rank-1 update and read-out per element, read once and written once. A work item
  // streams whole rows of one head (contiguous memory); with fewer heads than threads the rows are split and
  // the partial read-outs summed after, in a fixed order.
  const int64_t items = B * H;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((2 * at::get_num_threads() + items - 1) / items, Dk / kMinRows));
  at::Tensor out = at::empty({B, V}, options);
  at::Tensor partial = splits > 1 ? at::empty({items * splits, Dv}, options) : out;
  A* out_p = out.data_ptr<A>();
  A* partial_p = partial.data_ptr<A>();
  S* state_p = state.data_ptr<S>();
  const A* head_p = head_w.data_ptr<A>();
  auto head_out = [&](A* o, int64_t bh) {  // per-head RMSNorm, then the output gate
    rms_norm(o, head_p, Dv, head_eps);
    const A* g = gate.row(bh / H) + (bh % H) * Dv;
#pragma omp simd
    for (int64_t j = 0; j < Dv; ++j) o[j] *= g[j];
  };
  at::parallel_for(0, items * splits, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t bh = item / splits, part = item % splits;
      const int64_t b = bh / H, h = bh % H;
      const int64_t r0 = part * Dk / splits, r1 = (part + 1) * Dk / splits;
      const A c = carry_p[bh];
      const A* kick_h = kick_p + b * QK + h * Dk;
      const A* q_h = qr_p + b * QK + h * Dk;
      const A* vh = vv_p + b * V + h * Dv;
      A* o = partial_p + item * Dv;
      std::fill(o, o + Dv, A(0));
      for (int64_t r = r0; r < r1; ++r) {
        const A kr = kick_h[r], qr_r = q_h[r];
        S* row = state_p + (bh * Dk + r) * Dv;
        if constexpr (std::is_same_v<S, c10::BFloat16>) {
          uint16_t* bits = reinterpret_cast<uint16_t*>(row);
#pragma omp simd
          for (int64_t j = 0; j < Dv; ++j) {
            const uint16_t stored = bf16_bits(bf16_value(bits[j]) * c + kr * vh[j]);
            bits[j] = stored;
            o[j] += qr_r * bf16_value(stored);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < Dv; ++j) {
            const S stored = S(A(row[j]) * c + kr * vh[j]);
            row[j] = stored;
            o[j] += qr_r * A(stored);
          }
        }
      }
      if (splits == 1) head_out(o, bh);
    }
  });
  if (splits > 1) {
    for (int64_t bh = 0; bh < items; ++bh) {
      A* o = out_p + bh * Dv;
      std::copy(partial_p + bh * splits * Dv, partial_p + (bh * splits + 1) * Dv, o);
      for (int64_t part = 1; part < splits; ++part) {
        const A* p = partial_p + (bh * splits + part) * Dv;
#pragma omp simd
        for (int64_t j = 0; j < Dv; ++j) o[j] += p[j];
      }
      head_out(o, bh);
    }
  }
  return out;
}

at::Tensor retention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,
                          at::TensorList k_shallow, at::TensorList v_shallow,
                          const c10::optional<at::Tensor>& gate_hidden, const c10::optional<at::Tensor>& k_gate_weight,
                          const c10::optional<at::Tensor>& v_gate_weight, const c10::optional<at::Tensor>& k_norm,
                          const c10::optional<at::Tensor>& v_norm, double kv_eps, const at::Tensor& signed_sin,
                          const at::Tensor& cos, const at::Tensor& log_decay, at::Tensor& state, at::Tensor& scale,
                          const c10::optional<at::Tensor>& mask, const at::Tensor& head_norm, double head_eps) {
  TORCH_CHECK(state.dim() == 4 && scale.dim() == 2, "retention_step: state [B, H, Dk, Dv] and scale [B, H]");
  const auto run = [&](auto stored, auto arithmetic) {
    using S = decltype(stored);
    using A = decltype(arithmetic);
    return retention_step_impl<S, A>(q, k, v, gate, k_shallow, v_shallow, gate_hidden, k_gate_weight, v_gate_weight,
                                     k_norm, v_norm, kv_eps, signed_sin, cos, log_decay, state, scale, mask, head_norm,
                                     head_eps);
  };
  switch (state.scalar_type()) {
    case at::kFloat:
      return run(float{}, float{});
    case at::kBFloat16:
      return run(c10::BFloat16{}, float{});
    case at::kDouble:
      return run(double{}, double{});
    default:
      TORCH_CHECK(false, "retention_step: a state of dtype ", state.scalar_type(), " is not supported");
  }
}

// ---- selective scan (DenseMamba) ------------------------------------------------------------------------

// One token through the causal conv window: returns silu(conv) (0 on padded rows) and shifts the window in place.
template <typename T, typename A>
at::Tensor conv_step_impl(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
                          at::Tensor& window, const c10::optional<at::Tensor>& mask_in) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const int64_t B = window.size(0), K1 = window.size(1), D = window.size(2);
  at::Tensor x = rows(x_in, B, acc);
  at::Tensor taps = weight_in.reshape({D, K1 + 1}).t().to(acc).contiguous();  // [K, D]: a row per tap
  at::Tensor bias = bias_in ? bias_in->to(acc).contiguous() : at::Tensor();
  at::Tensor mask;
  if (mask_in) mask = mask_in->reshape({B}).to(at::kBool).contiguous();
  at::Tensor past = window.to(acc).contiguous();  // read before the window shifts (the same tensor in fp32)
  at::Tensor u = at::empty({B, D}, x.options());
  const A *x_p = x.data_ptr<A>(), *w_p = taps.data_ptr<A>(), *bias_p = opt_ptr<A>(bias);
  const A* past_p = past.data_ptr<A>();
  const bool* mask_p = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  T* win = window.data_ptr<T>();
  A* u_p = u.data_ptr<A>();
  std::vector<A> y(D);
  for (int64_t b = 0; b < B; ++b) {  // serial: small (see retention_step)
    const bool real = mask_p == nullptr || mask_p[b];
    const A* xb = x_p + b * D;
    std::fill(y.begin(), y.end(), A(0));
    for (int64_t j = 0; j < K1; ++j) {
      const A* row = past_p + (b * K1 + j) * D;
      const A* w = w_p + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) y[d] += row[d] * w[d];
    }
    const A* w = w_p + K1 * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] += as_stored<T>(xb[d]) * w[d];
    if (bias_p) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) y[d] += bias_p[d];
    }
    A* ub = u_p + b * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const A v = as_stored<T>(y[d]);
      ub[d] = real ? v / (A(1) + exp_simd(-v)) : A(0);  // silu; padding: 0
    }
    if (!real) continue;  // a padded token leaves the window as it was
    T* wb = win + b * K1 * D;
    std::memmove(wb, wb + D, sizeof(T) * (K1 - 1) * D);
    store_row(wb + (K1 - 1) * D, xb, D);
  }
  return u.to(x_in.scalar_type());
}

at::Tensor mamba_conv_step(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::Tensor& window, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(window.dim() == 3 && window.is_contiguous() && window.size(1) >= 1,
              "mamba_conv_step: the conv window must be a contiguous [B, K-1, D] tensor");
  switch (window.scalar_type()) {
    case at::kFloat:
      return conv_step_impl<float, float>(x, weight, bias, window, mask);
    case at::kBFloat16:
      return conv_step_impl<c10::BFloat16, float>(x, weight, bias, window, mask);
    case at::kDouble:
      return conv_step_impl<double, double>(x, weight, bias, window, mask);
    default:
      TORCH_CHECK(false, "mamba_conv_step: a window of dtype ", window.scalar_type(), " is not supported");
  }
}

// h <- exp(Δ A) h + Δ u B, read out with C, plus the shallow states read out with C in the same pass and the
// same sum: y = C·(h + g ⊙ Σ_i h_i) + D ⊙ u, times silu(z). Δ is taken as 0 on padded rows: the identity step.
// The dense gate g = silu(silu(hidden) @ W^T) (its second layer, packed: silu_gate) is formed first.
template <typename A>
at::Tensor scan_step_impl(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
                          const at::Tensor& B_in, const at::Tensor& C_in, const at::Tensor& D_in, const at::Tensor& z_in,
                          at::TensorList shallow, const c10::optional<at::Tensor>& gate_hidden_in,
                          const c10::optional<at::Tensor>& gate_weight_in, at::Tensor& state,
                          const c10::optional<at::Tensor>& mask_in) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const int64_t Bn = state.size(0), D = state.size(1), N = state.size(2);
  at::Tensor u = rows(u_in, Bn, acc), dt = rows(delta_in, Bn, acc), z = rows(z_in, Bn, acc);
  at::Tensor Bm = rows(B_in, Bn, acc), Cm = rows(C_in, Bn, acc);
  at::Tensor Am = A_in.to(acc).contiguous(), Dm = D_in.to(acc).contiguous();
  TORCH_CHECK(u.size(1) == D && dt.size(1) == D && z.size(1) == D && Bm.size(1) == N && Cm.size(1) == N &&
                  Am.numel() == D * N,
              "scan_step: inputs do not match the state's shape");
  std::vector<at::Tensor> hs;
  for (const auto& t : shallow) {
    TORCH_CHECK(t.numel() == Bn * D * N, "scan_step: a shallow state of another shape");
    hs.push_back(t.to(acc).contiguous());
  }
  at::Tensor gate;  // the dense gate over every channel, [Bn, D]
  if (!hs.empty()) {
    const auto hidden = row_view<A>(at::silu(*gate_hidden_in), Bn);
    gate = silu_gate<A>(hidden, 0, Bn, *gate_weight_in, D, "mamba_scan_step");
    TORCH_CHECK(hidden.held.size(1) == gate_weight_in->size(1),
                "mamba_scan_step: the dense gate's hidden units do not match its weight");
  }
  at::Tensor mask;
  if (mask_in) mask = mask_in->reshape({Bn}).to(at::kBool).contiguous();
  at::Tensor y = at::empty({Bn, D}, u.options());
  const A *u_p = u.data_ptr<A>(), *dt_p = dt.data_ptr<A>(), *z_p = z.data_ptr<A>();
  const A *B_p = Bm.data_ptr<A>(), *C_p = Cm.data_ptr<A>(), *A_p = Am.data_ptr<A>(), *D_p = Dm.data_ptr<A>();
  const A* g_p = opt_ptr<A>(gate);
  const bool* mask_p = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  std::vector<const A*> hs_p;
  for (auto& t : hs) hs_p.push_back(t.data_ptr<A>());
  A* h_p = state.data_ptr<A>();
  A* y_p = y.data_ptr<A>();
  // a work item: one row's block of channels, in passes over small buffers that stay in L1, each pass one
  // long vectorisable loop (the decay's exp over the whole block, not 16 elements at a time)
  constexpr int64_t kChannels = 64;
  const int64_t blocks = (D + kChannels - 1) / kChannels;
  // the state size as a compile-time constant in the common case (Mamba's 16): loops of known length
  auto run = [&](auto size) {
    constexpr int64_t kSize = decltype(size)::value;
    const int64_t NN = kSize ? kSize : N;
    at::parallel_for(0, Bn * blocks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<A> decay(kChannels * NN), read(kChannels * NN), shallow, delta(kChannels), out(kChannels);
      if (hs_p.size() > 2) shallow.resize(kChannels * NN);
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t b = item / blocks, d0 = (item % blocks) * kChannels, width = std::min(D, d0 + kChannels) - d0;
        const bool real = mask_p == nullptr || mask_p[b];
        const A* Bb = B_p + b * NN;
        const A* Cb = C_p + b * NN;
        const A* ub = u_p + b * D + d0;
        for (int64_t c = 0; c < width; ++c) delta[c] = real ? dt_p[b * D + d0 + c] : A(0);  // padding: identity
        for (int64_t c = 0; c < width; ++c) {
          const A* Ad = A_p + (d0 + c) * NN;
  #pragma omp simd
          for (int64_t n = 0; n < NN; ++n) decay[c * NN + n] = delta[c] * Ad[n];
        }
  #pragma omp simd
        for (int64_t i = 0; i < width * NN; ++i) decay[i] = exp_simd(decay[i]);
        A* h = h_p + (b * D + d0) * NN;
        if (hs_p.empty()) {
          for (int64_t c = 0; c < width; ++c) {
            const A du = delta[c] * ub[c];
  #pragma omp simd
            for (int64_t n = 0; n < NN; ++n) {
              const A next = du * Bb[n] + decay[c * NN + n] * h[c * NN + n];
              h[c * NN + n] = next;
              read[c * NN + n] = next * Cb[n];
            }
          }
        } else {  // the layers below, read out with this layer's C in the same sum: C·(h + g ⊙ Σ_i h_i)
          const int64_t at = (b * D + d0) * NN;
          const A* gb = g_p + b * D + d0;
          auto update = [&](auto shallow_at) {
            for (int64_t c = 0; c < width; ++c) {
              const A du = delta[c] * ub[c], gc = gb[c];
  #pragma omp simd
              for (int64_t n = 0; n < NN; ++n) {
                const int64_t k = c * NN + n;
                const A next = du * Bb[n] + decay[k] * h[k];
                h[k] = next;
                read[k] = (next + gc * shallow_at(k)) * Cb[n];
              }
            }
          };
          // one or two layers below (m = 1, 2) are read where they are used; more are summed in a buffer first
          const A* s0 = hs_p[0] + at;
          const A* s1 = hs_p.size() > 1 ? hs_p[1] + at : nullptr;
          if (hs_p.size() == 1) {
            update([&](int64_t k) { return s0[k]; });
          } else if (hs_p.size() == 2) {
            update([&](int64_t k) { return s0[k] + s1[k]; });
          } else {
  #pragma omp simd
            for (int64_t k = 0; k < width * NN; ++k) shallow[k] = s0[k] + s1[k];
            for (size_t i = 2; i < hs_p.size(); ++i) {
  #pragma omp simd
              for (int64_t k = 0; k < width * NN; ++k) shallow[k] += hs_p[i][at + k];
            }
            update([&](int64_t k) { return shallow[k]; });
          }
        }
        for (int64_t c = 0; c < width; ++c) {
          A sum = 0;
  #pragma omp simd reduction(+ : sum)
          for (int64_t n = 0; n < NN; ++n) sum += read[c * NN + n];
          out[c] = sum;
        }
        const A* zb = z_p + b * D + d0;
        A* yb = y_p + b * D + d0;
        const A* Db = D_p + d0;
  #pragma omp simd
        for (int64_t c = 0; c < width; ++c) yb[c] = (out[c] + ub[c] * Db[c]) * (zb[c] / (A(1) + exp_simd(-zb[c])));
      }
    });
  };
  if (N == 16) {
    run(std::integral_constant<int64_t, 16>{});
  } else {
    run(std::integral_constant<int64_t, 0>{});
  }
  return y;
}

at::Tensor mamba_scan_step(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, at::TensorList shallow,
                           const c10::optional<at::Tensor>& gate_hidden, const c10::optional<at::Tensor>& gate_weight,
                           at::Tensor& state, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous(), "mamba_scan_step: the state must be a contiguous [B, D, N]");
  TORCH_CHECK(shallow.empty() || (gate_hidden && gate_weight), "mamba_scan_step: shallow states need the dense gate");
  switch (state.scalar_type()) {
    case at::kFloat:
      return scan_step_impl<float>(u, delta, A, B, C, D, z, shallow, gate_hidden, gate_weight, state, mask);
    case at::kDouble:
      return scan_step_impl<double>(u, delta, A, B, C, D, z, shallow, gate_hidden, gate_weight, state, mask);
    default:
      TORCH_CHECK(false, "mamba_scan_step: a state of dtype ", state.scalar_type(), " is not supported");
  }
}

}  // namespace

TORCH_LIBRARY(densessm_fused, m) {
  m.def(
      "retention_step(Tensor q, Tensor k, Tensor v, Tensor gate, Tensor[] k_shallow, Tensor[] v_shallow, "
      "Tensor? gate_hidden, Tensor? k_gate_weight, Tensor? v_gate_weight, Tensor? k_norm, Tensor? v_norm, "
      "float kv_eps, Tensor signed_sin, Tensor cos, Tensor log_decay, Tensor(a!) state, Tensor(b!) scale, "
      "Tensor? mask, Tensor head_norm, float head_eps) -> Tensor");
  m.def("mamba_conv_step(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) window, Tensor? mask) -> Tensor");
  m.def(
      "mamba_scan_step(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor z, Tensor[] shallow, "
      "Tensor? gate_hidden, Tensor? gate_weight, Tensor(a!) state, Tensor? mask) -> Tensor");
  m.impl("retention_step", c10::DispatchKey::CPU, TORCH_FN(retention_step));
  m.impl("mamba_conv_step", c10::DispatchKey::CPU, TORCH_FN(mamba_conv_step));
  m.impl("mamba_scan_step", c10::DispatchKey::CPU, TORCH_FN(mamba_scan_step));
}
