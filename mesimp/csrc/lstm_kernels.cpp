// Compiled MePropLSTM backward (issue 15), registered as torch.ops.mesimp.lstm_backward.
//
// The unified-selection BPTT of _MePropLSTMFunction.backward (mesimp/nn/lstm.py, the
// reference) in one call: per step (t = T-1 .. 0) the element-wise gate derivatives, the
// MSBP add on the (step, row) overlap, the unit scores (sum over the batch and the four
// gates of |dg|), the top-k units, their 4k gate rows gathered from dg and from [W_hh | W_ih],
// then two GEMMs through ATen's BLAS: [dh_{t-1} | dx_t] = sel @ [W_hh | W_ih][rows] and
// sel^T @ [h_{t-1} | x_t], scattered into the rows of dW_hh and dW_ih; the bias rows, the
// new MSBP memory and the hit counters. Python pays ~25 dispatched ops per step for this;
// here the element-wise part is one pass over [B, 4h] and the rest is two GEMM calls.
//
// Selection as kernels.cpp: the k largest scores, ties broken by the lower index, NaN as
// +inf; masked units (mask == 0) score -1. The element-wise loops follow the Python op
// order (no contraction, -ffp-contract=off); the GEMMs do not give the Python path's bits
// (one fused [dh | dx] product, another BLAS blocking), so results agree to float32
// rounding, selections exactly except on near-ties.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "select.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using at::Tensor;
using mesimp_select::key_of;
using mesimp_select::top_indices;

// One step's gate gradients for one batch row, in the Python path's op order:
//   dh = (dh + dout) * m;  do = dh * tanh(c);  dc = (dc + (dh * o) * (1 - tanh(c)^2)) * m
//   dg = [dc * g, dc * c_prev, dc * i, do] times [i - i^2, f - f^2, 1 - g^2, o - o^2]
//   (+ the MSBP memory row);  dc <- dc * f;  colsum += |dg|.
// Templated on the mask and the memory so that the loop has no branch; ivdep: the four
// gate blocks of dg and colsum are disjoint (GCC otherwise gives up on the alias checks
// between them and leaves the loop scalar).
template <bool kMask, bool kMem>
MESIMP_CLONES void gates_row(int64_t h, const float* __restrict dh_in,
                                  const float* __restrict dout, const float* __restrict m,
                                  const float* __restrict a, const float* __restrict tc,
                                  const float* __restrict c_prev, const float* __restrict mem,
                                  float* __restrict dc, float* __restrict dg,
                                  float* __restrict colsum) {
#pragma GCC ivdep
  for (int64_t j = 0; j < h; ++j) {
    float dhv = dh_in[j] + dout[j];
    if constexpr (kMask) dhv = dhv * m[j];
    const float t = tc[j];
    const float o = a[3 * h + j];
    const float dov = dhv * t;
    float dcv = dc[j] + (dhv * o) * (1.f - t * t);
    if constexpr (kMask) dcv = dcv * m[j];
    const float i = a[j], f = a[h + j], g = a[2 * h + j];
    float vi = (dcv * g) * (i - i * i);
    float vf = (dcv * c_prev[j]) * (f - f * f);
    float vg = (dcv * i) * (1.f - g * g);
    float vo = dov * (o - o * o);
    if constexpr (kMem) {
      vi = vi + mem[j];
      vf = vf + mem[h + j];
      vg = vg + mem[2 * h + j];
      vo = vo + mem[3 * h + j];
    }
    dg[j] = vi;
    dg[h + j] = vf;
    dg[2 * h + j] = vg;
    dg[3 * h + j] = vo;
    dc[j] = dcv * f;
    colsum[j] += std::fabs(vi);
    colsum[h + j] += std::fabs(vf);
    colsum[2 * h + j] += std::fabs(vg);
    colsum[3 * h + j] += std::fabs(vo);
  }
}

using GatesRowFn = void (*)(int64_t, const float*, const float*, const float*, const float*,
                            const float*, const float*, const float*, float*, float*, float*);

// dst[j] += src[j]
MESIMP_CLONES void add_row(int64_t n, const float* __restrict src, float* __restrict dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

// dst[j] = src[j] * s
MESIMP_CLONES void scale_row(int64_t n, const float* __restrict src, float s,
                                  float* __restrict dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * s;
}

// Working arrays kept between calls (one set per thread): no allocation per step.
struct LstmScratch {
  std::vector<float> dg, dh, dc, colsum, key, bmax, sel, wcat, dhx, hx, prod;
  std::vector<int64_t> idx;
  std::vector<char> touched;
};

void check_f32(const Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim,
              "mesimp lstm_backward: ", what, " must be a ", dim, "-D float32 CPU tensor");
}

// A [rows, cols] float32 tensor over scratch memory (ld = cols), for ATen's GEMMs.
Tensor view2d(std::vector<float>& v, int64_t rows, int64_t cols) {
  v.resize(std::max<int64_t>(rows * cols, 1));
  return at::from_blob(v.data(), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// The unified-selection meProp BPTT of _MePropLSTMFunction.backward (see the file header).
// Shapes: dout [T, B, h] (last dim contiguous), dh_n, dc_n, h_init [B, h], x [T, B, in],
// w_ih [4h, in], w_hh [4h, h], acts [T, B, 4h] (i, f, o sigmoids, g tanh), cs [T+1, B, h]
// (c_0 .. c_T), tcs [T, B, h] (tanh c_t), out [T, B, h] (h_1 .. h_T); mask: float [h] (0 =
// masked) or None; memory: the MSBP memory [T', B', 4h], already masked, or None; hits
// int64 [h], ref int64 [] (updated when count). Returns (dx, dh0, dc0, dW_ih, dW_hh, db,
// new memory), undefined where not needed (new memory: alpha > 0 only).
std::vector<Tensor> lstm_backward(const Tensor& dout_in, const Tensor& dh_n, const Tensor& dc_n,
                                  const Tensor& x_in, const Tensor& h_init_in,
                                  const Tensor& w_ih_in, const Tensor& w_hh_in,
                                  const Tensor& acts_in, const Tensor& cs_in,
                                  const Tensor& tcs_in, const Tensor& out_in,
                                  const std::optional<Tensor>& mask_in,
                                  const std::optional<Tensor>& memory_in, const Tensor& hits,
                                  const Tensor& ref, int64_t k, double alpha, bool count,
                                  bool need_dx, bool need_dh0, bool need_dc0, bool need_dw_ih,
                                  bool need_dw_hh, bool need_db) {
  check_f32(dout_in, 3, "dout");
  check_f32(x_in, 3, "x");
  check_f32(w_ih_in, 2, "w_ih");
  check_f32(w_hh_in, 2, "w_hh");
  check_f32(acts_in, 3, "acts");
  check_f32(cs_in, 3, "cs");
  check_f32(tcs_in, 3, "tcs");
  check_f32(out_in, 3, "out");
  check_f32(dh_n, 2, "dh_n");
  check_f32(dc_n, 2, "dc_n");
  check_f32(h_init_in, 2, "h_init");
  const int64_t T = x_in.size(0), B = x_in.size(1), n_in = x_in.size(2);
  const int64_t h = w_hh_in.size(1), h4 = 4 * h;
  TORCH_CHECK(T >= 1 && B >= 1, "mesimp lstm_backward: needs T, B >= 1");
  TORCH_CHECK(w_hh_in.size(0) == h4 && w_ih_in.size(0) == h4 && w_ih_in.size(1) == n_in,
              "mesimp lstm_backward: weight shapes do not match");
  TORCH_CHECK(dout_in.sizes() == at::IntArrayRef({T, B, h}) &&
                  acts_in.sizes() == at::IntArrayRef({T, B, h4}) &&
                  cs_in.sizes() == at::IntArrayRef({T + 1, B, h}) &&
                  tcs_in.sizes() == at::IntArrayRef({T, B, h}) &&
                  out_in.sizes() == at::IntArrayRef({T, B, h}) &&
                  dh_n.sizes() == at::IntArrayRef({B, h}) &&
                  dc_n.sizes() == at::IntArrayRef({B, h}) &&
                  h_init_in.sizes() == at::IntArrayRef({B, h}),
              "mesimp lstm_backward: state shapes do not match");
  TORCH_CHECK(k >= 1 && k < h, "mesimp lstm_backward: k must be in [1, hidden)");
  TORCH_CHECK(hits.scalar_type() == at::kLong && hits.numel() == h && hits.is_contiguous() &&
                  ref.scalar_type() == at::kLong && ref.numel() == 1,
              "mesimp lstm_backward: hits [h] and ref must be int64");

  // dout: any strides for the step and batch dims (the batch_first transpose's gradient)
  const Tensor dout = dout_in.stride(2) == 1 ? dout_in : dout_in.contiguous();
  const Tensor x = x_in.contiguous(), h_init = h_init_in.contiguous();
  const Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor acts = acts_in.contiguous(), cs = cs_in.contiguous();
  const Tensor tcs = tcs_in.contiguous(), out = out_in.contiguous();
  Tensor mask, memory;
  if (mask_in.has_value()) {
    mask = mask_in->contiguous();
    check_f32(mask, 1, "mask");
    TORCH_CHECK(mask.numel() == h, "mesimp lstm_backward: mask must have h entries");
  }
  int64_t t_mem = 0, b_mem = 0;
  if (alpha > 0 && memory_in.has_value()) {
    memory = memory_in->contiguous();
    check_f32(memory, 3, "memory");
    TORCH_CHECK(memory.size(2) == h4, "mesimp lstm_backward: memory must be [T', B', 4h]");
    t_mem = std::min(T, memory.size(0));
    b_mem = std::min(B, memory.size(1));
  }
  const float* mp = mask.defined() ? mask.data_ptr<float>() : nullptr;
  const float* memp = memory.defined() ? memory.data_ptr<float>() : nullptr;
  const int64_t mem_s0 = memory.defined() ? memory.size(1) * h4 : 0;

  const auto opt = x.options();
  Tensor dx = need_dx ? at::empty({T, B, n_in}, opt) : Tensor();
  // dW rows are written whole the first time a step selects them and zeroed at the end if
  // no step did: no 4h-row zero fill before the loop
  Tensor dw_ih = need_dw_ih ? at::empty({h4, n_in}, opt) : Tensor();
  Tensor dw_hh = need_dw_hh ? at::empty({h4, h}, opt) : Tensor();
  Tensor db = need_db ? at::zeros({h4}, opt) : Tensor();
  Tensor new_mem = alpha > 0 ? at::empty({T, B, h4}, opt) : Tensor();
  const float falpha = static_cast<float>(alpha);

  thread_local LstmScratch s;
  const int64_t R = 4 * k;
  // [dh | dx] = sel @ [W_hh | W_ih][rows]; [dW_hh | dW_ih][rows] += sel^T @ [h_prev | x_t]
  const int64_t ncols = h + (need_dx ? n_in : 0);
  const int64_t hcols = need_dw_hh ? h : 0;
  const int64_t pcols = hcols + (need_dw_ih ? n_in : 0);
  Tensor sel = view2d(s.sel, B, R);
  Tensor wcat = view2d(s.wcat, R, ncols);
  Tensor dhx = view2d(s.dhx, B, ncols);
  Tensor hx = view2d(s.hx, B, std::max<int64_t>(pcols, 1));
  Tensor prod = view2d(s.prod, R, std::max<int64_t>(pcols, 1));
  Tensor sel_t = sel.t();
  s.dg.resize(B * h4);
  s.dh.resize(B * h);
  s.dc.resize(B * h);
  s.colsum.resize(h4);
  s.key.resize(h);
  float* dg = s.dg.data();
  float* dc = s.dc.data();
  float* colsum = s.colsum.data();
  float* key = s.key.data();
  float* selp = s.sel.data();
  float* wcatp = s.wcat.data();
  float* dhxp = s.dhx.data();
  float* hxp = s.hx.data();
  float* prodp = s.prod.data();
  {
    const Tensor dhc = dh_n.contiguous(), dcc = dc_n.contiguous();
    std::copy(dhc.data_ptr<float>(), dhc.data_ptr<float>() + B * h, s.dh.data());
    std::copy(dcc.data_ptr<float>(), dcc.data_ptr<float>() + B * h, dc);
  }
  // dh of the step: dh_n first, then the GEMM's [B, ncols] output (its first h columns)
  const float* dh_cur = s.dh.data();
  int64_t dh_ld = h;

  const float* doutp = dout.data_ptr<float>();
  const int64_t do_s0 = dout.stride(0), do_s1 = dout.stride(1);
  const float* xp = x.data_ptr<float>();
  const float* wihp = w_ih.data_ptr<float>();
  const float* whhp = w_hh.data_ptr<float>();
  const float* ap = acts.data_ptr<float>();
  const float* csp = cs.data_ptr<float>();
  const float* tcp = tcs.data_ptr<float>();
  const float* outp = out.data_ptr<float>();
  const float* h0p = h_init.data_ptr<float>();
  float* dxp = need_dx ? dx.data_ptr<float>() : nullptr;
  float* dwihp = need_dw_ih ? dw_ih.data_ptr<float>() : nullptr;
  float* dwhhp = need_dw_hh ? dw_hh.data_ptr<float>() : nullptr;
  float* dbp = need_db ? db.data_ptr<float>() : nullptr;
  float* nmp = alpha > 0 ? new_mem.data_ptr<float>() : nullptr;
  int64_t* hp = hits.data_ptr<int64_t>();
  std::vector<int64_t>& idx = s.idx;
  s.touched.assign(h4, 0);
  char* touched = s.touched.data();

  for (int64_t t = T - 1; t >= 0; --t) {
    // element-wise BPTT and the unit scores
    std::fill(colsum, colsum + h4, 0.f);
    for (int64_t b = 0; b < B; ++b) {
      const float* mem = (t < t_mem && b < b_mem) ? memp + t * mem_s0 + b * h4 : nullptr;
      const GatesRowFn row_fn = mp ? (mem ? &gates_row<true, true> : &gates_row<true, false>)
                                   : (mem ? &gates_row<false, true> : &gates_row<false, false>);
      row_fn(h, dh_cur + b * dh_ld, doutp + t * do_s0 + b * do_s1, mp,
                ap + (t * B + b) * h4, tcp + (t * B + b) * h, csp + (t * B + b) * h, mem,
                dc + b * h, dg + b * h4, colsum);
    }
    for (int64_t j = 0; j < h; ++j) {
      const float sc = ((colsum[j] + colsum[h + j]) + colsum[2 * h + j]) + colsum[3 * h + j];
      key[j] = (mp && mp[j] == 0.f) ? -1.f : key_of(sc);
    }
    top_indices(key, h, k, idx, s.bmax);
    if (count)
      for (int64_t j : idx) hp[j] += B;

    // the 4k selected gate rows (gate-major): sel [B, R], [W_hh | W_ih][rows] [R, ncols]
    for (int64_t b = 0; b < B; ++b) {
      const float* g = dg + b * h4;
      float* o = selp + b * R;
      for (int64_t gate = 0; gate < 4; ++gate)
        for (int64_t q = 0; q < k; ++q) o[gate * k + q] = g[gate * h + idx[q]];
    }
    for (int64_t gate = 0; gate < 4; ++gate)
      for (int64_t q = 0; q < k; ++q) {
        const int64_t row = gate * h + idx[q];
        float* o = wcatp + (gate * k + q) * ncols;
        std::copy(whhp + row * h, whhp + (row + 1) * h, o);
        if (need_dx) std::copy(wihp + row * n_in, wihp + (row + 1) * n_in, o + h);
      }
    if (nmp) {  // the residual: every row, the k units' gate columns zeroed
      float* nm = nmp + t * B * h4;
      for (int64_t b = 0; b < B; ++b) {
        scale_row(h4, dg + b * h4, falpha, nm + b * h4);
        for (int64_t gate = 0; gate < 4; ++gate)
          for (int64_t q = 0; q < k; ++q) nm[b * h4 + gate * h + idx[q]] = 0.f;
      }
    }
    if (pcols > 0) {  // [dW_hh | dW_ih][rows] += sel^T @ [h_{t-1} | x_t]
      const float* hprev = t ? outp + (t - 1) * B * h : h0p;
      for (int64_t b = 0; b < B; ++b) {
        float* o = hxp + b * pcols;
        if (need_dw_hh) std::copy(hprev + b * h, hprev + (b + 1) * h, o);
        if (need_dw_ih) std::copy(xp + (t * B + b) * n_in, xp + (t * B + b + 1) * n_in, o + hcols);
      }
      at::mm_out(prod, sel_t, hx);
      for (int64_t gate = 0; gate < 4; ++gate)
        for (int64_t q = 0; q < k; ++q) {
          const int64_t r = gate * k + q, row = gate * h + idx[q];
          const float* p = prodp + r * pcols;
          if (touched[row]) {
            if (need_dw_hh) add_row(h, p, dwhhp + row * h);
            if (need_dw_ih) add_row(n_in, p + hcols, dwihp + row * n_in);
          } else {
            if (need_dw_hh) std::copy(p, p + h, dwhhp + row * h);
            if (need_dw_ih) std::copy(p + hcols, p + pcols, dwihp + row * n_in);
            touched[row] = 1;
          }
        }
    }
    if (dbp) {  // db[rows] += sel.sum(0), the batch summed in order
      for (int64_t r = 0; r < R; ++r) {
        float acc = 0.f;
        for (int64_t b = 0; b < B; ++b) acc += selp[b * R + r];
        const int64_t gate = r / k, q = r % k;
        dbp[gate * h + idx[q]] += acc;
      }
    }
    // [dh_{t-1} | dx_t] = sel @ [W_hh | W_ih][rows]
    at::mm_out(dhx, sel, wcat);
    if (need_dx)
      for (int64_t b = 0; b < B; ++b)
        std::copy(dhxp + b * ncols + h, dhxp + (b + 1) * ncols, dxp + (t * B + b) * n_in);
    dh_cur = dhxp;
    dh_ld = ncols;
  }
  if (count) ref.add_(T * B);
  for (int64_t row = 0; row < h4; ++row)
    if (!touched[row]) {
      if (need_dw_hh) std::fill(dwhhp + row * h, dwhhp + (row + 1) * h, 0.f);
      if (need_dw_ih) std::fill(dwihp + row * n_in, dwihp + (row + 1) * n_in, 0.f);
    }

  Tensor dh0, dc0;
  if (need_dh0) {
    dh0 = at::empty({B, h}, opt);
    float* o = dh0.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < h; ++j) {
        const float v = dh_cur[b * dh_ld + j];
        o[b * h + j] = mp ? v * mp[j] : v;
      }
  }
  if (need_dc0) {
    dc0 = at::empty({B, h}, opt);
    float* o = dc0.data_ptr<float>();
    for (int64_t i = 0; i < B * h; ++i) o[i] = mp ? dc[i] * mp[i % h] : dc[i];
  }
  return {dx, dh0, dc0, dw_ih, dw_hh, db, new_mem};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mesimp, m) {
  m.def(
      "lstm_backward(Tensor dout, Tensor dh_n, Tensor dc_n, Tensor x, Tensor h_init, "
      "Tensor w_ih, Tensor w_hh, Tensor acts, Tensor cs, Tensor tcs, Tensor out, Tensor? mask, "
      "Tensor? memory, Tensor(a!) hits, Tensor(b!) ref, int k, float alpha, bool count, "
      "bool need_dx, bool need_dh0, bool need_dc0, bool need_dw_ih, bool need_dw_hh, "
      "bool need_db) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mesimp, CompositeExplicitAutograd, m) {
  m.impl("lstm_backward", &lstm_backward);
}
