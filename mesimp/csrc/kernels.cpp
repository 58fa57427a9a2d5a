// Compiled meProp kernels (issue 15), registered with TORCH_LIBRARY as torch.ops.mesimp.*.
//
// The Python path (mesimp/nn/meprop.py) is the reference; these ops compute the same
// thing with less dispatch and bookkeeping:
//   linear_backward   one meProp Linear backward: selection, counters, MSBP memory,
//                     gathered GEMMs (ATen's BLAS), bias gradient, dense or COO dW
//   mlp_forward       a whole Linear-ReLU stack as one C++ autograd node (StackFunction):
//                     its backward is the stack's meProp backward, behind loss.backward()
//                     with no Python in between
//   optimizer_step    the step of RowSparseAdam / RowSparseAdagrad / RowSparseSGD: each
//                     row a gradient names is updated in one pass (lazy, row-sparse)
//   mlp_train_step    forward, cross-entropy, backward and the optimizer step in one call
//
// Selection order: the k largest scores, ties broken by the lower index (a strict total
// order, so the selected set is unique), NaN counts as +inf (as torch.topk does); masked
// units score -1. Random selection scores each entry with torch.rand's draw from the
// default generator (the Python path's draw, in the same order), then selects as top-k.
// Hot loops use GCC's target_clones (runtime dispatch AVX2/baseline) and
// -ffp-contract=off, so every ISA gives the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "select.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using at::Tensor;
using mesimp_select::key_of;
using mesimp_select::top_indices;

// A parallel_for grain, in rows of d floats, of at least min_floats floats of work per
// task: small shapes run on the calling thread, with no OpenMP fork/join.
inline int64_t grain_rows(int64_t d, int64_t min_floats) {
  return std::max<int64_t>(1, min_floats / std::max<int64_t>(d, 1));
}

enum Selection : int64_t { kDense = 0, kUnified = 1, kTopk = 2, kRandom = 3 };

// Bumped when an op's schema or meaning changes (3: grad buffers, activations, dropout,
// AdamW and lazy dense rows), so that Python can tell
// a stale build (mesimp/nn/kernels.py's ABI) from a current one.
#define MESIMP_ABI 3
constexpr int64_t kAbiVersion = MESIMP_ABI;
#define MESIMP_STR2(x) #x
#define MESIMP_STR(x) MESIMP_STR2(x)
// The same version as a string in the library's data: mesimp/nn/build.py reads it from the
// file, so that a library built from other sources is never loaded.
extern "C" __attribute__((used, visibility("default"))) const char mesimp_abi_tag[] =
    "MESIMP_KERNELS_ABI=" MESIMP_STR(MESIMP_ABI);

// score[j] = sum_i |u[i, j]| for the columns [j0, j1) of u [rows, n], rows accumulated in
// order (so a split over column ranges gives the same bits)
MESIMP_CLONES void abs_colsum(int64_t rows, int64_t n, int64_t j0, int64_t j1,
                              const float* __restrict u, float* __restrict score) {
  for (int64_t j = j0; j < j1; ++j) score[j] = 0.f;
  for (int64_t i = 0; i < rows; ++i) {
    const float* r = u + i * n;
    for (int64_t j = j0; j < j1; ++j) score[j] += std::fabs(r[j]);
  }
}

// dy[i] = 0 where the ReLU output h[i] <= 0 (threshold_backward)
MESIMP_CLONES void relu_mask(int64_t n, const float* __restrict h, float* __restrict g) {
  for (int64_t i = 0; i < n; ++i) g[i] = h[i] <= 0.f ? 0.f : g[i];
}

// 8 floats as one value (GCC vector extension; unaligned): explicit vectors, because GCC
// left the chunked loop below scalar; may_alias: it reads and writes float arrays.
// Lane-wise multiply then add (no contraction), so every ISA gives the scalar bits.
typedef float v8f __attribute__((vector_size(32), aligned(4), __may_alias__));

// One column chunk [c0, c0 + 8V) of weighted_rows_sum, accumulated in registers.
template <int V>
inline void weighted_chunk(int64_t c0, int64_t m, const float* const* rows, const float* w,
                           float* __restrict out) {
  v8f acc[V];
  for (int q = 0; q < V; ++q) acc[q] = v8f{};
  for (int64_t e = 0; e < m; ++e) {
    const v8f* r = reinterpret_cast<const v8f*>(rows[e] + c0);
    const float v = w[e];
    for (int q = 0; q < V; ++q) acc[q] += v * r[q];
  }
  v8f* o = reinterpret_cast<v8f*>(out + c0);
  for (int q = 0; q < V; ++q) o[q] = acc[q];
}

// out = 0 + sum_e w[e] * rows[e], accumulated in e order for every element (the bits of m
// successive axpys into a zeroed row), written once: out need not be initialised. Column
// chunks of 64, then 8, then single columns, all in registers (a scalar tail that went
// through memory took over half of the per-example top-k backward).
MESIMP_CLONES void weighted_rows_sum(int64_t d, int64_t m, const float* const* rows,
                                     const float* w, float* __restrict out) {
  int64_t c0 = 0;
  for (; c0 + 64 <= d; c0 += 64) weighted_chunk<8>(c0, m, rows, w, out);
  for (; c0 + 8 <= d; c0 += 8) weighted_chunk<1>(c0, m, rows, w, out);
  for (; c0 < d; ++c0) {
    float acc = 0.f;
    for (int64_t e = 0; e < m; ++e) acc += w[e] * rows[e][c0];
    out[c0] = acc;
  }
}

// Working arrays of row_top_indices, kept between calls.
struct RowScratch {
  std::vector<float> bmax, ck;
  std::vector<int32_t> ci;
  std::vector<int64_t> tmp;
};

// The k largest of key[0..n) (ties: lower index first), sorted ascending, for one row of
// the per-example selection; the same set as top_indices, without its data-dependent
// branches (their mispredictions were most of its time at n=500, k=20). A bound first: the
// maxima of B = 2k strided blocks (block b = {b, b+B, ...}, an elementwise max over rows
// of B keys) hold k distinct keys >= their k-th largest t, so only keys >= t can be
// selected. t is found by ranking the B maxima, the ~k..2k candidates >= t by ranking them
// (rank < k: selected; ranks by key, ties by position, so they are a permutation), both
// branch-free; candidates come in index order, so the output needs no sort. Large k or
// many candidates (ties, e.g. a row with fewer than k nonzeros) take nth_element.
MESIMP_CLONES void row_top_indices(const float* __restrict key, int64_t n, int64_t k,
                                   int64_t* __restrict out, RowScratch& s) {
  constexpr int64_t kRankMax = 96;  // rank-count at most this many values (c^2 compares)
  const int64_t B = 2 * k;
  float t = -std::numeric_limits<float>::infinity();
  if (2 * B <= n) {
    s.bmax.resize(B);
    float* __restrict m = s.bmax.data();
    for (int64_t b = 0; b < B; ++b) m[b] = key[b];
    int64_t r = B;
    for (; r + B <= n; r += B)
      for (int64_t b = 0; b < B; ++b) m[b] = key[r + b] > m[b] ? key[r + b] : m[b];
    for (int64_t b = 0; r + b < n; ++b) m[b] = key[r + b] > m[b] ? key[r + b] : m[b];
    if (B <= kRankMax) {
      for (int64_t a = 0; a < B; ++a) {
        const float v = m[a];
        int32_t rank = 0;
        for (int64_t b = 0; b < a; ++b) rank += m[b] >= v;
        for (int64_t b = a + 1; b < B; ++b) rank += m[b] > v;
        t = rank == k - 1 ? v : t;
      }
    } else {
      std::nth_element(m, m + (k - 1), m + B, std::greater<float>());
      t = m[k - 1];
    }
  }
  s.ck.resize(n);
  s.ci.resize(n);
  float* __restrict ck = s.ck.data();
  int32_t* __restrict ci = s.ci.data();
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j) {
    ck[c] = key[j];
    ci[c] = static_cast<int32_t>(j);
    c += key[j] >= t;
  }
  if (c <= kRankMax) {
    s.tmp.resize(c);  // every candidate is written (branch-free), the first k are the set
    int64_t* __restrict sel = s.tmp.data();
    int64_t o = 0;
    for (int64_t a = 0; a < c; ++a) {
      const float v = ck[a];
      int32_t rank = 0;
      for (int64_t b = 0; b < a; ++b) rank += ck[b] >= v;
      for (int64_t b = a + 1; b < c; ++b) rank += ck[b] > v;
      sel[o] = ci[a];
      o += rank < k;
    }
    std::copy(sel, sel + k, out);
    return;
  }
  s.tmp.assign(ci, ci + c);
  auto better = [key](int64_t a, int64_t b) {
    return key[a] > key[b] || (key[a] == key[b] && a < b);
  };
  std::nth_element(s.tmp.begin(), s.tmp.begin() + k, s.tmp.end(), better);
  std::copy(s.tmp.begin(), s.tmp.begin() + k, out);
  std::sort(out, out + k);
}

Tensor index_tensor(const std::vector<int64_t>& v) {
  Tensor t = at::empty({(int64_t)v.size()}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

// Rows sel of a contiguous w [n, d], as a new [|sel|, d]: index_select's bits, without
// its dispatch (a tenth of the time at meProp's sizes).
Tensor gather_rows(const Tensor& w, const std::vector<int64_t>& sel) {
  const int64_t d = w.size(1);
  Tensor out = at::empty({(int64_t)sel.size(), d}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (size_t t = 0; t < sel.size(); ++t)
    std::memcpy(dst + t * d, src + sel[t] * d, d * sizeof(float));
  return out;
}

// A layer's gradients. dw is dense [n, d], or, when rows is defined, the rows' gradients
// [|rows|, d] (rows ascending, every other row zero): the trainer's optimizer step takes
// them as they are; the autograd path turns them into a COO or a dense tensor.
struct LayerGrads {
  Tensor dx, dw, rows, db, memory;
};

// Copies rows t of src [|rows|, d] to rows rows[t] of dst [n, d]; parallel over rows when
// there is enough to copy (grain: ~64 KB a task, so small layers stay on one thread).
void scatter_rows(const Tensor& rows, const float* src, float* dst, int64_t d) {
  const int64_t* rp = rows.data_ptr<int64_t>();
  at::parallel_for(0, rows.numel(), grain_rows(d, 32768), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) std::memcpy(dst + rp[t] * d, src + t * d, d * sizeof(float));
  });
}

Tensor weight_grad(const LayerGrads& g, at::IntArrayRef shape, bool sparse_grad) {
  if (!g.rows.defined()) return g.dw;
  if (sparse_grad)
    return at::_sparse_coo_tensor_with_dims_and_tensors(
        1, 1, shape, g.rows.view({1, -1}), g.dw, g.dw.options().layout(at::kSparse), true);
  Tensor dense = at::zeros(shape, g.dw.options());
  scatter_rows(g.rows, g.dw.data_ptr<float>(), dense.data_ptr<float>(), shape[1]);
  return dense;
}

// A meProp weight's persistent dense gradient (mesimp/nn/grad_buffer.py, which documents
// the rules; this is the same logic for the compiled paths, on the same three tensors):
// buf [n, d] is zero outside rows as long as its version counter reads version.
struct GradBuf {
  Tensor buf, rows, version;
};

// The dense gradient of weight from g's rows, written into the layer's buffer where the
// rules allow (weight.grad unset, the buffer's storage ours alone, float32 CPU), zeroing
// only the rows written the step before (all of it if anything wrote to it since); else a
// fresh zero-filled tensor. The result aliases the buffer, so AccumulateGrad adopts it.
Tensor dense_weight_grad(const LayerGrads& g, const Tensor& weight, GradBuf* gb) {
  if (!g.rows.defined()) return g.dw;
  if (gb == nullptr || weight.grad().defined() || gb->buf.scalar_type() != at::kFloat ||
      !gb->buf.device().is_cpu() || gb->rows.scalar_type() != at::kLong ||
      !gb->rows.device().is_cpu() || gb->version.scalar_type() != at::kLong ||
      gb->version.numel() != 1 || !gb->version.device().is_cpu())
    return weight_grad(g, weight.sizes(), false);
  Tensor& buf = gb->buf;
  const int64_t d = weight.size(1);
  int64_t* version = gb->version.data_ptr<int64_t>();
  at::NoGradGuard no_grad;
  if (buf.sizes() != weight.sizes() || !buf.is_contiguous() || buf.storage().use_count() != 1) {
    buf.set_(at::zeros(weight.sizes(), weight.options()));
  } else if (buf._version() != *version) {
    buf.zero_();
  } else {
    const Tensor old = gb->rows.contiguous();
    const int64_t* op = old.data_ptr<int64_t>();
    float* bp = buf.data_ptr<float>();
    at::parallel_for(0, old.numel(), grain_rows(d, 32768), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) std::fill(bp + op[t] * d, bp + (op[t] + 1) * d, 0.f);
    });
  }
  scatter_rows(g.rows, g.dw.data_ptr<float>(), buf.data_ptr<float>(), d);
  const int64_t n = g.rows.numel();
  if (gb->rows.numel() != n || !gb->rows.is_contiguous()) gb->rows.set_(at::empty({n}, at::kLong));
  std::memcpy(gb->rows.data_ptr<int64_t>(), g.rows.data_ptr<int64_t>(), n * sizeof(int64_t));
  *version = buf._version();
  return buf.detach();
}

// The per-example top-k backward's working arrays, kept between calls.
struct TopkScratch {
  std::vector<int64_t> idx, counts, start, uni, fill, ex;
  std::vector<float> vals, ev;
};

struct LayerArgs {
  int64_t k = 0;
  int64_t selection = kDense;
  double alpha = 0.0;
  bool count = true;
  bool has_bias = true;
  bool dense_bias = false;
  bool sparse_grad = false;
};

// A layer's dx and dW GEMMs. At meProp's sizes (k rows) each is too small for the BLAS to
// split well across threads, so with several threads they run side by side, one thread
// each, instead of one after the other (one task each: no fork with one thread).
template <typename A, typename B>
void both_gemms(bool need_a, A&& a, bool need_b, B&& b) {
  if (!(need_a && need_b) || at::get_num_threads() < 2 || at::in_parallel_region()) {
    if (need_a) a();
    if (need_b) b();
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) t == 0 ? a() : b();
  });
}

// One layer's meProp backward; dy [N, n] float32 contiguous, x [N, d], weight [n, d].
// Row-sparse dw (rows defined) when the layer selects; db dense.
LayerGrads layer_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                          const std::optional<Tensor>& mask, const std::optional<Tensor>& memory,
                          const Tensor& hits, const Tensor& ref, const LayerArgs& a,
                          bool need_dx, bool need_dw, bool need_db) {
  LayerGrads out;
  const int64_t N = dy.size(0), n = dy.size(1), d = x.size(1);
  if (a.selection == kDense) {  // a plain (masked) Linear: dense gradients, no counting
    Tensor g = mask.has_value() ? dy * *mask : dy;
    both_gemms(
        need_dx, [&] { out.dx = g.mm(weight); }, need_dw, [&] { out.dw = g.t().mm(x); });
    if (need_db && a.has_bias) out.db = g.sum(0);
    return out;
  }
  Tensor u = dy;
  if (a.alpha > 0 && memory.has_value() && memory->sizes() == dy.sizes()) u = dy + *memory;
  u = u.contiguous();
  const float* up = u.data_ptr<float>();
  const bool* mp = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  int64_t* hp = hits.data_ptr<int64_t>();
  const float falpha = static_cast<float>(a.alpha);
  Tensor xc = x.contiguous();

  if (a.selection == kUnified) {
    std::vector<float> score(n);
    // in parallel over column ranges of at least ~32K entries (rows x columns) a task
    at::parallel_for(0, n, grain_rows(N, 32768), [&](int64_t j0, int64_t j1) {
      abs_colsum(N, n, j0, j1, up, score.data());
    });
    for (int64_t j = 0; j < n; ++j) score[j] = (mp && !mp[j]) ? -1.f : key_of(score[j]);
    std::vector<int64_t> sel_v;
    std::vector<float> bmax;
    top_indices(score.data(), n, a.k, sel_v, bmax);
    const int64_t k = a.k;
    Tensor sel = index_tensor(sel_v);
    Tensor u_sel = at::empty({N, k}, u.options());
    float* sp = u_sel.data_ptr<float>();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t t = 0; t < k; ++t) sp[i * k + t] = up[i * n + sel_v[t]];
    if (a.count) {
      for (int64_t j : sel_v) hp[j] += N;
      ref.data_ptr<int64_t>()[0] += N;
    }
    if (a.alpha > 0) {
      out.memory = at::empty_like(u);
      float* mo = out.memory.data_ptr<float>();
      for (int64_t i = 0; i < N * n; ++i) mo[i] = up[i] * falpha;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j : sel_v) mo[i * n + j] = 0.f;
    }
    both_gemms(
        need_dx, [&] { out.dx = u_sel.mm(gather_rows(weight.contiguous(), sel_v)); },
        need_dw, [&] { out.dw = u_sel.t().mm(xc); });
    if (need_dw) out.rows = sel;
    if (need_db && a.has_bias && !a.dense_bias) {  // u_sel.sum(0): the Python path's bits
      const Tensor s = u_sel.sum(0);
      const float* ssp = s.data_ptr<float>();
      out.db = at::zeros({n}, u.options());
      float* bp = out.db.data_ptr<float>();
      for (int64_t t = 0; t < k; ++t) bp[sel_v[t]] = ssp[t];
    }
  } else {  // per-example top-k or random-k: b*k*d work for dx and dW
    const int64_t k = a.k;
    // random: one uniform draw per entry, torch.rand(u.shape) as the Python path draws it
    const Tensor draw = a.selection == kRandom ? at::rand({N, n}, u.options()) : Tensor();
    const float* dp = draw.defined() ? draw.data_ptr<float>() : nullptr;
    TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "mesimp kernels: layer too wide");
    // scratch reused across calls (one set per thread): no per-call allocations
    thread_local TopkScratch sc;
    sc.idx.resize(N * k);
    sc.vals.resize(N * k);
    sc.counts.assign(n, 0);
    std::vector<int64_t>& idx = sc.idx;
    std::vector<float>& vals = sc.vals;
    std::vector<int64_t>& counts = sc.counts;
    // the examples' selections are independent: in parallel where there is enough work
    // (~16K keys a task), each thread with its own key row and scratch
    at::parallel_for(0, N, grain_rows(n, 16384), [&](int64_t lo, int64_t hi) {
      thread_local std::vector<float> key_row;
      thread_local RowScratch row_scratch;
      key_row.resize(n);
      float* key = key_row.data();
      for (int64_t i = lo; i < hi; ++i) {
        const float* r = up + i * n;
        if (dp) {
          const float* dr = dp + i * n;
          for (int64_t j = 0; j < n; ++j) key[j] = (mp && !mp[j]) ? -1.f : dr[j];
        } else {
          for (int64_t j = 0; j < n; ++j) key[j] = (mp && !mp[j]) ? -1.f : key_of(std::fabs(r[j]));
        }
        int64_t* row = &idx[i * k];
        row_top_indices(key, n, k, row, row_scratch);
        for (int64_t t = 0; t < k; ++t) vals[i * k + t] = r[row[t]];
      }
    });
    for (int64_t e = 0; e < N * k; ++e) counts[idx[e]] += 1;
    if (a.count) {
      for (int64_t j = 0; j < n; ++j) hp[j] += counts[j];
      ref.data_ptr<int64_t>()[0] += N;
    }
    if (a.alpha > 0) {
      out.memory = at::empty_like(u);
      float* mo = out.memory.data_ptr<float>();
      for (int64_t i = 0; i < N * n; ++i) mo[i] = up[i] * falpha;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t t = 0; t < k; ++t) mo[i * n + idx[i * k + t]] = 0.f;
    }
    Tensor wc = weight.contiguous();
    const float* wp = wc.data_ptr<float>();
    const float* xp = xc.data_ptr<float>();
    // group the N*k selected entries by unit (CSR): each W row and dW row is touched once
    std::vector<int64_t>&start = sc.start, &uni = sc.uni;
    start.assign(n + 1, 0);
    uni.clear();
    for (int64_t j = 0; j < n; ++j) {
      start[j + 1] = start[j] + counts[j];
      if (counts[j] > 0) uni.push_back(j);
    }
    sc.fill.assign(start.begin(), start.end() - 1);
    sc.ex.resize(N * k);
    sc.ev.resize(N * k);
    std::vector<int64_t>&fill = sc.fill, &ex = sc.ex;
    std::vector<float>& ev = sc.ev;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t t = 0; t < k; ++t) {
        const int64_t j = idx[i * k + t], e = fill[j]++;
        ex[e] = i;
        ev[e] = vals[i * k + t];
      }
    if (need_dx) {  // dx[i] = sum_t vals[i, t] W[idx[i, t]], one example at a time
      out.dx = at::empty({N, d}, u.options());  // every row written whole
      float* dxp = out.dx.data_ptr<float>();
      at::parallel_for(0, N, grain_rows(k * d, 32768), [&](int64_t lo, int64_t hi) {
        thread_local std::vector<const float*> rows;
        rows.resize(k);
        for (int64_t i = lo; i < hi; ++i) {
          for (int64_t t = 0; t < k; ++t) rows[t] = wp + idx[i * k + t] * d;
          weighted_rows_sum(d, k, rows.data(), &vals[i * k], dxp + i * d);
        }
      });
    }
    if (need_dw) {  // dW[j] = sum over the entries that selected j of val * x[example]
      // row-sparse: [|U|, d], every row written whole (a dense gradient is made from it)
      out.dw = at::empty({(int64_t)uni.size(), d}, u.options());
      float* dwp = out.dw.data_ptr<float>();
      const int64_t U = (int64_t)uni.size();
      const int64_t per_unit = std::max<int64_t>(1, N * k / std::max<int64_t>(U, 1)) * d;
      at::parallel_for(0, U, grain_rows(per_unit, 32768), [&](int64_t lo, int64_t hi) {
        thread_local std::vector<const float*> rows;
        rows.resize(N);
        for (int64_t q = lo; q < hi; ++q) {
          const int64_t j = uni[q], m = start[j + 1] - start[j];
          for (int64_t e = 0; e < m; ++e) rows[e] = xp + ex[start[j] + e] * d;
          weighted_rows_sum(d, m, rows.data(), &ev[start[j]], dwp + q * d);
        }
      });
      out.rows = index_tensor(uni);
    }
    if (need_db && a.has_bias && !a.dense_bias) {
      out.db = at::zeros({n}, u.options());
      float* bp = out.db.data_ptr<float>();
      for (int64_t e = 0; e < N * k; ++e) bp[idx[e]] += vals[e];
    }
  }
  if (need_db && a.has_bias && a.dense_bias) out.db = mask.has_value() ? dy.sum(0).mul_(*mask) : dy.sum(0);
  return out;
}

void check_cpu_float(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2,
              "mesimp kernels: ", what, " must be a 2-D float32 CPU tensor");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_backward(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& memory, const Tensor& hits, const Tensor& ref, int64_t k,
    int64_t selection, double alpha, bool count, bool has_bias, bool dense_bias, bool need_dx,
    bool need_dw, bool need_db, bool sparse_grad, at::TensorList grad_buffer) {
  check_cpu_float(dy, "dy");
  check_cpu_float(x, "x");
  check_cpu_float(weight, "weight");
  TORCH_CHECK(selection >= kUnified && selection <= kRandom, "mesimp kernels: bad selection");
  TORCH_CHECK(k >= 1 && k <= dy.size(1), "mesimp kernels: k out of range");
  LayerArgs a{k, selection, alpha, count, has_bias, dense_bias, sparse_grad};
  LayerGrads g = layer_backward(dy.contiguous(), x, weight, mask, memory, hits, ref, a, need_dx,
                                need_dw, need_db);
  GradBuf gb;
  const bool buffered = !sparse_grad && grad_buffer.size() == 3;
  if (buffered) gb = {grad_buffer[0], grad_buffer[1], grad_buffer[2]};
  Tensor dw;
  if (need_dw)
    dw = sparse_grad ? weight_grad(g, weight.sizes(), true)
                     : dense_weight_grad(g, weight, buffered ? &gb : nullptr);
  return {g.dx, dw, g.db, g.memory};
}

// -- the Linear-ReLU stack ----------------------------------------------------------------
// Per-layer arguments, and the tensors the backward updates in place: the hit counters
// and, for MSBP layers, the memory tensor, which the backward points at its new memory
// (Tensor::set_), so the module's MePropState sees it without a round trip; a dense-gradient
// meProp layer's GradBuf. After every layer but the last: an activation (act) and dropout
// (probability, 0 = none), what nn.Sequential's ReLU / GELU / Dropout children compute.
enum Act : int64_t { kNoAct = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3 };

struct Stack {
  std::vector<LayerArgs> args;
  std::vector<std::optional<Tensor>> masks, memories;
  std::vector<Tensor> hits, refs;
  std::vector<int64_t> act;
  std::vector<double> dropout;
  std::vector<GradBuf> bufs;
  std::vector<bool> buffered;
};

// What the forward keeps for the backward, per layer l < L-1 (undefined where unused): the
// activation's input (GELU) or output (ReLU followed by dropout), and the dropout noise.
struct StackSaved {
  std::vector<Tensor> xs, acts, noises;  // xs: each layer's input (x, then the hidden ones)
};

Stack make_stack(const c10::List<std::optional<Tensor>>& masks,
                 const c10::List<std::optional<Tensor>>& memories, at::TensorList hits,
                 at::TensorList refs, at::IntArrayRef ks, at::IntArrayRef selections,
                 at::ArrayRef<double> alphas, at::IntArrayRef flags,
                 at::ArrayRef<double> dropouts, at::TensorList grad_buffers, size_t L) {
  TORCH_CHECK(masks.size() == L && memories.size() == L && hits.size() == L &&
                  refs.size() == L && ks.size() == L && selections.size() == L &&
                  alphas.size() == L && flags.size() == L && dropouts.size() == L,
              "mesimp kernels: per-layer lists of different lengths");
  Stack s;
  size_t bi = 0;
  for (size_t l = 0; l < L; ++l) {
    LayerArgs a;
    a.k = ks[l];
    a.selection = selections[l];
    a.alpha = alphas[l];
    // flags: bit 0 count, 1 has_bias, 2 dense_bias, 3 sparse_grad, 4 grad buffer,
    // bits 5-6 the activation after the layer (Act)
    a.count = flags[l] & 1;
    a.has_bias = flags[l] & 2;
    a.dense_bias = flags[l] & 4;
    a.sparse_grad = flags[l] & 8;
    const bool buffered = flags[l] & 16;
    const int64_t act = (flags[l] >> 5) & 3;
    TORCH_CHECK(a.selection == kDense || (a.k >= 1 && a.selection <= kRandom),
                "mesimp kernels: bad selection or k");
    TORCH_CHECK(a.alpha <= 0 || memories.get(l).has_value(),
                "mesimp kernels: an MSBP layer needs its memory tensor");
    TORCH_CHECK(dropouts[l] >= 0 && dropouts[l] < 1, "mesimp kernels: dropout must be in [0, 1)");
    TORCH_CHECK(l + 1 < L || (act == kNoAct && dropouts[l] == 0),
                "mesimp kernels: the last layer has no activation or dropout");
    s.args.push_back(a);
    s.masks.push_back(masks.get(l));
    s.memories.push_back(memories.get(l));
    s.hits.push_back(hits[l]);
    s.refs.push_back(refs[l]);
    s.act.push_back(act);
    s.dropout.push_back(dropouts[l]);
    s.buffered.push_back(buffered);
    if (buffered) {
      TORCH_CHECK(bi + 3 <= grad_buffers.size(), "mesimp kernels: too few grad buffers");
      s.bufs.push_back({grad_buffers[bi], grad_buffers[bi + 1], grad_buffers[bi + 2]});
      bi += 3;
    } else {
      s.bufs.emplace_back();
    }
  }
  TORCH_CHECK(bi == grad_buffers.size(), "mesimp kernels: grad buffers do not match the layers");
  return s;
}

// params = [W0, (b0), W1, (b1), ...]: biases where flags bit 1 says so.
void split_params(at::TensorList params, const Stack& s, std::vector<Tensor>& weights,
                  std::vector<Tensor>& biases) {
  size_t pi = 0;
  for (const LayerArgs& a : s.args) {
    TORCH_CHECK(pi < params.size(), "mesimp kernels: too few params");
    check_cpu_float(params[pi], "weight");
    weights.push_back(params[pi++]);
    if (a.has_bias) {
      TORCH_CHECK(pi < params.size(), "mesimp kernels: too few params");
      biases.push_back(params[pi++]);
    } else {
      biases.emplace_back();
    }
  }
  TORCH_CHECK(pi == params.size(), "mesimp kernels: params do not match the layers");
}

// drop(act((x W0^T + b0) * mask0)) ... W_L^T + b_L: what MePropLinear / nn.Linear and the
// ReLU / GELU / Dropout children compute, op for op (the same ATen calls, so the same bits
// and, for dropout, the same draws from the default generator in the same order).
Tensor stack_forward(const Tensor& x, const std::vector<Tensor>& weights,
                     const std::vector<Tensor>& biases, const Stack& s, StackSaved& sv) {
  check_cpu_float(x, "x");
  const size_t L = weights.size();
  sv.xs.assign(1, x);
  sv.acts.assign(L, Tensor());
  sv.noises.assign(L, Tensor());
  Tensor h = x;
  for (size_t l = 0; l < L; ++l) {
    const Tensor& W = weights[l];
    Tensor o = biases[l].defined() ? at::addmm(biases[l], h, W.t()) : h.mm(W.t());
    if (s.masks[l].has_value()) o.mul_(*s.masks[l]);
    if (l + 1 < L) {
      const double p = s.dropout[l];
      if (s.act[l] == kRelu) {
        o.relu_();
        if (p > 0) sv.acts[l] = o;  // else the next layer's input is the ReLU output
      } else if (s.act[l] != kNoAct) {
        sv.acts[l] = o;
        o = at::gelu(o, s.act[l] == kGeluTanh ? "tanh" : "none");
      }
      if (p > 0) {  // torch's dropout on CPU: a Bernoulli(1-p) noise scaled by 1/(1-p)
        Tensor noise = at::empty_like(o).bernoulli_(1 - p);
        noise.div_(1 - p);
        o = o * noise;
        sv.noises[l] = noise;
      }
      sv.xs.push_back(o);
    }
    h = o;
  }
  return h;
}

// Backward of stack_forward from the output's gradient; per layer its LayerGrads. The
// MSBP memories are updated (set_) here.
std::vector<LayerGrads> stack_backward(const Tensor& dout, const StackSaved& sv,
                                       const std::vector<Tensor>& weights, const Stack& s,
                                       bool need_dx0) {
  const size_t L = weights.size();
  std::vector<LayerGrads> out(L);
  Tensor dy = dout.contiguous();
  for (size_t li = L; li-- > 0;) {
    const bool need_dx = li > 0 || need_dx0;
    LayerGrads g = layer_backward(dy, sv.xs[li], weights[li], s.masks[li], s.memories[li],
                                  s.hits[li], s.refs[li], s.args[li], need_dx, true, true);
    if (s.args[li].alpha > 0 && g.memory.defined()) s.memories[li]->set_(g.memory);
    if (li > 0) {  // through layer li-1's dropout and activation, as autograd goes
      const size_t p = li - 1;
      dy = g.dx.contiguous();
      if (sv.noises[p].defined()) dy = dy * sv.noises[p];
      if (s.act[p] == kRelu) {
        const Tensor h = (sv.acts[p].defined() ? sv.acts[p] : sv.xs[li]).contiguous();
        relu_mask(dy.numel(), h.data_ptr<float>(), dy.data_ptr<float>());
      } else if (s.act[p] != kNoAct) {
        dy = at::gelu_backward(dy, sv.acts[p], s.act[p] == kGeluTanh ? "tanh" : "none");
      }
      dy = dy.contiguous();
      g.dx = Tensor();
    }
    out[li] = std::move(g);
  }
  return out;
}

// -- optimizers ---------------------------------------------------------------------------
// One step over parameters whose gradients are dense or row-sparse (the rows ascending and
// unique): only those rows are read and written, the lazy update meProp needs (a dense
// optimizer would sweep all of W), in one pass over each row. Step counters are float32 or
// float64 scalars.
enum Optim : int64_t { kAdam = 0, kAdagrad = 1, kSgd = 2 };

struct Grad {
  Tensor values;  // dense [same shape as the param], or [|rows|, d]
  Tensor rows;    // int64 [|rows|], or undefined (dense)
  Tensor hint;    // dense values: the rows outside which they are zero, or undefined (any)
  bool lazy = false;  // update only the rows with a nonzero gradient (RowSparseAdamW)
};

double bump_step(const Tensor& step) {
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu(), "mesimp kernels: bad step counter");
  if (step.scalar_type() == at::kFloat) return ++step.data_ptr<float>()[0];
  if (step.scalar_type() == at::kDouble) return ++step.data_ptr<double>()[0];
  step.add_(1);
  return step.item<double>();
}

// Adagrad and SGD as torch computes them (lr_decay and eps as in torch.optim.Adagrad; no
// weight decay, momentum or maximize: the Python side sends those to torch's own step).
MESIMP_CLONES void adagrad_span(float* __restrict p, float* __restrict s,
                                const float* __restrict g, int64_t n, float neg_clr, float eps) {
  for (int64_t i = 0; i < n; ++i) {
    const float si = s[i] + g[i] * g[i];
    s[i] = si;
    p[i] = p[i] + neg_clr * (g[i] / (std::sqrt(si) + eps));
  }
}

MESIMP_CLONES void sgd_span(float* __restrict p, const float* __restrict g, int64_t n,
                            float neg_lr) {
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] + neg_lr * g[i];
}

// The (param, state...) spans a gradient names: the whole tensor, or each of its rows.
// Lazy: the rows whose gradient is all zero (-0.0 included) are skipped; NaN is nonzero.
MESIMP_CLONES bool any_nonzero(const float* __restrict g, int64_t n) {
  bool any = false;
  for (int64_t i = 0; i < n; ++i) any |= g[i] != 0.f;
  return any;
}

// Element-wise updates cost ~2 ns a float: a task of 16K floats is worth a fork/join.
constexpr int64_t kOptimGrain = 16384;

// Calls f(offset, gradient, length) on disjoint spans, in parallel where there is enough
// work (each element's update is independent, so the bits do not depend on the threads).
template <typename F>
void for_spans(const Tensor& p, const Grad& g, F&& f) {
  const float* gv = g.values.data_ptr<float>();
  const int64_t R = p.dim() ? p.size(0) : 1;
  const int64_t d = p.numel() / std::max<int64_t>(R, 1);
  if (g.rows.defined()) {  // row-sparse: values row t is row rows[t]
    const int64_t* rp = g.rows.data_ptr<int64_t>();
    for (int64_t t = 0; t < g.rows.numel(); ++t)
      TORCH_CHECK(rp[t] >= 0 && rp[t] < R, "mesimp kernels: gradient row out of range");
    at::parallel_for(0, g.rows.numel(), grain_rows(d, kOptimGrain), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t)
        if (!g.lazy || any_nonzero(gv + t * d, d)) f(rp[t] * d, gv + t * d, d);
    });
    return;
  }
  if (!g.lazy) {
    at::parallel_for(0, p.numel(), kOptimGrain, [&](int64_t lo, int64_t hi) {
      f(lo, gv + lo, hi - lo);
    });
    return;
  }
  // dense and lazy: the hinted rows (the others are zero), or every row
  const int64_t n = g.hint.defined() ? g.hint.numel() : R;
  const int64_t* hp = g.hint.defined() ? g.hint.data_ptr<int64_t>() : nullptr;
  for (int64_t t = 0; hp && t < n; ++t)
    TORCH_CHECK(hp[t] >= 0 && hp[t] < R, "mesimp kernels: gradient row out of range");
  at::parallel_for(0, n, grain_rows(d, kOptimGrain), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t r = hp ? hp[t] : t;
      if (any_nonzero(gv + r * d, d)) f(r * d, gv + r * d, d);
    }
  });
}

// Adam as torch.optim.Adam computes it (eps after the bias-corrected square root; the
// moment update as torch's lerp), in float32 without fused multiply-adds: the same bits
// on every CPU, within float32 rounding of torch's fused Adam (whose kernels fuse the
// moment update where the CPU has FMA). Replaces a gather, one torch._fused_adam_ over
// the gathered rows and a scatter back: a third of the step at meProp's sizes.
// AdamW's decoupled weight decay first, as torch does: p * (1 - lr * weight_decay) (exactly
// p when weight_decay is 0: x * 1.0f == x for every float).
struct AdamConsts {
  float c1, one_minus_c1, beta2, c2, bc2_sqrt, eps, neg_step_size, decay;
  bool lerp_small;
};

AdamConsts adam_consts(double step, double lr, double beta1, double beta2, double eps,
                       double weight_decay) {
  const double bc1 = 1 - std::pow(beta1, step), bc2 = 1 - std::pow(beta2, step);
  const float c1 = static_cast<float>(1 - beta1);
  return {c1,
          1.f - c1,
          static_cast<float>(beta2),
          static_cast<float>(1 - beta2),
          static_cast<float>(std::sqrt(bc2)),
          static_cast<float>(eps),
          static_cast<float>(-(lr / bc1)),
          static_cast<float>(1 - lr * weight_decay),
          std::fabs(c1) < 0.5f};
}

MESIMP_CLONES void adam_span(float* __restrict p, float* __restrict m, float* __restrict v,
                             const float* __restrict g, int64_t n, const AdamConsts c) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = c.lerp_small ? m[i] + c.c1 * (gi - m[i]) : gi - (gi - m[i]) * c.one_minus_c1;
    const float vi = v[i] * c.beta2 + c.c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * c.decay + c.neg_step_size * mi / (std::sqrt(vi) / c.bc2_sqrt + c.eps);
  }
}

// hyper: adam [lr, beta1, beta2, eps] or, AdamW, [lr, beta1, beta2, eps, weight_decay];
// adagrad [lr, lr_decay, eps]; sgd [lr].
void optimizer_update(int64_t kind, const std::vector<Tensor>& params,
                      const std::vector<Grad>& grads, at::TensorList state1,
                      at::TensorList state2, at::TensorList steps, at::ArrayRef<double> hyper) {
  const size_t P = params.size();
  for (size_t i = 0; i < P; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous(),
                "mesimp kernels: parameters must be contiguous float32 CPU tensors");
    const Grad& g = grads[i];
    const int64_t row = p.dim() ? p.numel() / std::max<int64_t>(p.size(0), 1) : 1;
    TORCH_CHECK(g.values.scalar_type() == at::kFloat && g.values.is_contiguous() &&
                    (g.rows.defined() ? p.dim() >= 1 && g.values.numel() == g.rows.numel() * row
                                      : g.values.numel() == p.numel()),
                "mesimp kernels: a gradient does not match its parameter");
  }
  for (at::TensorList st : {state1, state2})
    for (size_t i = 0; i < st.size(); ++i)
      TORCH_CHECK(st[i].scalar_type() == at::kFloat && st[i].is_contiguous() &&
                      st[i].numel() == params[i].numel(),
                  "mesimp kernels: optimizer state must match its parameter (contiguous float32)");
  if (kind == kAdam) {
    TORCH_CHECK((hyper.size() == 4 || hyper.size() == 5) && state1.size() == P &&
                    state2.size() == P && steps.size() == P,
                "mesimp kernels: Adam needs lr, betas, eps (weight decay) and its state per "
                "parameter");
    const double wd = hyper.size() == 5 ? hyper[4] : 0.0;
    for (size_t i = 0; i < P; ++i) {
      const AdamConsts c =
          adam_consts(bump_step(steps[i]), hyper[0], hyper[1], hyper[2], hyper[3], wd);
      float* p = params[i].data_ptr<float>();
      float* m = state1[i].data_ptr<float>();
      float* v = state2[i].data_ptr<float>();
      for_spans(params[i], grads[i], [&](int64_t off, const float* g, int64_t n) {
        adam_span(p + off, m + off, v + off, g, n, c);
      });
    }
  } else if (kind == kAdagrad) {
    TORCH_CHECK(hyper.size() == 3 && state1.size() == P && steps.size() == P,
                "mesimp kernels: Adagrad needs lr, lr_decay, eps and its state per parameter");
    for (size_t i = 0; i < P; ++i) {
      const double step = bump_step(steps[i]);
      const float neg_clr = static_cast<float>(-(hyper[0] / (1 + (step - 1) * hyper[1])));
      const float eps = static_cast<float>(hyper[2]);
      float* p = params[i].data_ptr<float>();
      float* s = state1[i].data_ptr<float>();
      for_spans(params[i], grads[i], [&](int64_t off, const float* g, int64_t n) {
        adagrad_span(p + off, s + off, g, n, neg_clr, eps);
      });
    }
  } else {
    TORCH_CHECK(kind == kSgd && hyper.size() == 1, "mesimp kernels: bad optimizer");
    const float neg_lr = static_cast<float>(-hyper[0]);
    for (size_t i = 0; i < P; ++i) {
      float* p = params[i].data_ptr<float>();
      for_spans(params[i], grads[i], [&](int64_t off, const float* g, int64_t n) {
        sgd_span(p + off, g, n, neg_lr);
      });
    }
  }
}

// A gradient as the optimizer kernels take it: COO (1 sparse dim; coalesced or at least
// with strictly ascending rows, else coalesced here) or dense.
Grad as_grad(const Tensor& g, const std::optional<Tensor>& hint, bool lazy) {
  if (!g.is_sparse()) {
    Tensor h;
    if (hint.has_value()) {
      TORCH_CHECK(hint->scalar_type() == at::kLong && hint->device().is_cpu() && hint->dim() == 1,
                  "mesimp kernels: row hints must be 1-D int64 CPU tensors");
      h = hint->contiguous();
    }
    return {g.contiguous(), Tensor(), h, lazy};
  }
  TORCH_CHECK(g.sparse_dim() == 1, "mesimp kernels: sparse gradients must be row-sparse");
  Tensor c = g;
  if (!c.is_coalesced()) {  // autograd drops the flag: re-sort only if really unsorted
    Tensor r = c._indices().select(0, 0).contiguous();
    const int64_t* rp = r.data_ptr<int64_t>();
    for (int64_t i = 1; i < r.numel(); ++i)
      if (rp[i - 1] >= rp[i]) {
        c = c.coalesce();
        break;
      }
  }
  return {c._values().contiguous(), c._indices().select(0, 0).contiguous(), Tensor(), lazy};
}

// hints: per dense gradient, the rows outside which it is zero (a meProp layer's GradBuf),
// or None; lazy: update only rows with a nonzero gradient (RowSparseAdamW).
void optimizer_step(int64_t kind, at::TensorList params, at::TensorList grads,
                    const c10::List<std::optional<Tensor>>& hints, at::TensorList state1,
                    at::TensorList state2, at::TensorList steps, at::ArrayRef<double> hyper,
                    bool lazy) {
  TORCH_CHECK(params.size() == grads.size() && hints.size() == grads.size(),
              "mesimp kernels: params, grads and hints differ in length");
  at::NoGradGuard no_grad;
  std::vector<Grad> gs;
  for (size_t i = 0; i < grads.size(); ++i) gs.push_back(as_grad(grads[i], hints.get(i), lazy));
  optimizer_update(kind, params.vec(), gs, state1, state2, steps, hyper);
}

}  // namespace

// -- the stack as one autograd node --------------------------------------------------------
// Named (not anonymous): the node's name, torch::autograd::CppNode<mesimp::StackFunction>,
// is how Python recognises it.
namespace mesimp {

// What the node keeps between forward and backward (a capsule in saved_data).
struct StackHolder : torch::CustomClassHolder {
  Stack s;
  StackSaved sv;  // xs[0] (x) is a saved variable instead, as are the weights
};

class StackFunction : public torch::autograd::Function<StackFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                        at::TensorList params, c10::intrusive_ptr<StackHolder> holder) {
    std::vector<Tensor> weights, biases;
    split_params(params, holder->s, weights, biases);
    Tensor out = stack_forward(x, weights, biases, holder->s, holder->sv);
    holder->sv.xs[0] = Tensor();
    std::vector<Tensor> saved{x};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["stack"] = c10::IValue::make_capsule(holder);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto holder = c10::static_intrusive_pointer_cast<StackHolder>(
        ctx->saved_data["stack"].toCapsule());
    Stack& s = holder->s;
    auto saved = ctx->get_saved_variables();
    holder->sv.xs[0] = saved[0];
    std::vector<Tensor> weights(saved.begin() + 1, saved.end());
    std::vector<LayerGrads> g = stack_backward(grad_out[0], holder->sv, weights, s,
                                               ctx->needs_input_grad(0));
    torch::autograd::variable_list out{g[0].dx};
    for (size_t l = 0; l < weights.size(); ++l) {
      const LayerArgs& a = s.args[l];
      out.push_back(a.sparse_grad ? weight_grad(g[l], weights[l].sizes(), true)
                                  : dense_weight_grad(g[l], weights[l],
                                                      s.buffered[l] ? &s.bufs[l] : nullptr));
      if (a.has_bias) out.push_back(g[l].db);
    }
    out.emplace_back();  // the holder: not a tensor
    return out;
  }
};

}  // namespace mesimp

namespace {

using mesimp::StackFunction;
using mesimp::StackHolder;

c10::intrusive_ptr<StackHolder> make_holder(
    const c10::List<std::optional<Tensor>>& masks, const c10::List<std::optional<Tensor>>& memories,
    at::TensorList hits, at::TensorList refs, at::IntArrayRef ks, at::IntArrayRef selections,
    at::ArrayRef<double> alphas, at::IntArrayRef flags, at::ArrayRef<double> dropouts,
    at::TensorList grad_buffers) {
  auto holder = c10::make_intrusive<StackHolder>();
  holder->s = make_stack(masks, memories, hits, refs, ks, selections, alphas, flags, dropouts,
                         grad_buffers, ks.size());
  return holder;
}

// Autograd kernel: the whole stack as one node, whose backward is stack_backward.
Tensor mlp_forward_autograd(const Tensor& x, at::TensorList params,
                            const c10::List<std::optional<Tensor>>& masks,
                            const c10::List<std::optional<Tensor>>& memories, at::TensorList hits,
                            at::TensorList refs, at::IntArrayRef ks, at::IntArrayRef selections,
                            at::ArrayRef<double> alphas, at::IntArrayRef flags,
                            at::ArrayRef<double> dropouts, at::TensorList grad_buffers) {
  return StackFunction::apply(x, params,
                              make_holder(masks, memories, hits, refs, ks, selections, alphas,
                                          flags, dropouts, grad_buffers));
}

// Below autograd (inference_mode, no gradient): the forward alone.
Tensor mlp_forward(const Tensor& x, at::TensorList params,
                   const c10::List<std::optional<Tensor>>& masks,
                   const c10::List<std::optional<Tensor>>& memories, at::TensorList hits,
                   at::TensorList refs, at::IntArrayRef ks, at::IntArrayRef selections,
                   at::ArrayRef<double> alphas, at::IntArrayRef flags,
                   at::ArrayRef<double> dropouts, at::TensorList grad_buffers) {
  Stack s = make_stack(masks, memories, hits, refs, ks, selections, alphas, flags, dropouts,
                       grad_buffers, ks.size());
  std::vector<Tensor> weights, biases;
  StackSaved sv;
  split_params(params, s, weights, biases);
  return stack_forward(x, weights, biases, s, sv);
}

// One training step of the stack with mean cross-entropy and an optimizer (kind, hyper,
// state as optimizer_update): the same ops as zero_grad + forward + F.cross_entropy +
// loss.backward() + the optimizer's step, leaving no gradients. Returns [loss, bad]:
// bad = -1, or the index in params of a non-finite gradient (checked when check_grads);
// a non-finite loss or gradient leaves the parameters and the optimizer state untouched.
std::vector<Tensor> mlp_train_step(const Tensor& x, const Tensor& y, at::TensorList params,
                                   const c10::List<std::optional<Tensor>>& masks,
                                   const c10::List<std::optional<Tensor>>& memories,
                                   at::TensorList hits, at::TensorList refs, at::IntArrayRef ks,
                                   at::IntArrayRef selections, at::ArrayRef<double> alphas,
                                   at::IntArrayRef flags, at::ArrayRef<double> dropouts,
                                   at::TensorList grad_buffers, int64_t optimizer,
                                   at::TensorList state1, at::TensorList state2,
                                   at::TensorList steps, at::ArrayRef<double> hyper, bool lazy,
                                   bool check_grads) {
  at::NoGradGuard no_grad;
  Stack s = make_stack(masks, memories, hits, refs, ks, selections, alphas, flags, dropouts,
                       grad_buffers, ks.size());
  std::vector<Tensor> weights, biases;
  StackSaved sv;
  split_params(params, s, weights, biases);
  for (const Tensor& p : params)  // as zero_grad(set_to_none=True) before the step
    if (p.grad().defined()) p.mutable_grad().reset();
  Tensor logits = stack_forward(x, weights, biases, s, sv);
  // F.cross_entropy(logits, y) and its backward, as autograd runs them: the same bits as
  // the loss.backward() path, so the trainer may take either path at any step
  Tensor logp = at::_log_softmax(logits, 1, false);
  auto [loss, total_weight] = at::nll_loss_forward(logp, y, {}, at::Reduction::Mean, -100);
  std::vector<Tensor> out{loss, at::scalar_tensor(-1, at::kLong)};
  if (!std::isfinite(loss.item<float>())) return out;
  Tensor gl = at::nll_loss_backward(at::ones_like(loss), logp, y, {}, at::Reduction::Mean, -100,
                                    total_weight);
  Tensor dlogits = at::_log_softmax_backward_data(gl, logp, 1, at::kFloat);
  std::vector<LayerGrads> g = stack_backward(dlogits, sv, weights, s, false);
  std::vector<Grad> grads;
  for (size_t l = 0; l < weights.size(); ++l) {
    // dense-exact and not lazy: a dense step (the rows of a lazy one are the nonzero rows
    // either way, so it takes the row-sparse gradient as it is)
    if (g[l].rows.defined() && !s.args[l].sparse_grad && !lazy)
      grads.push_back({weight_grad(g[l], weights[l].sizes(), false), Tensor(), Tensor(), false});
    else
      grads.push_back({g[l].dw, g[l].rows, Tensor(), lazy});
    if (s.args[l].has_bias) grads.push_back({g[l].db, Tensor(), Tensor(), lazy});
  }
  if (check_grads) {
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!at::isfinite(grads[i].values).all().item<bool>()) {
        out[1].fill_(static_cast<int64_t>(i));
        return out;
      }
    }
  }
  optimizer_update(optimizer, params.vec(), grads, state1, state2, steps, hyper);
  return out;
}

}  // namespace

static int64_t abi_version() { return kAbiVersion; }

TORCH_LIBRARY(mesimp, m) {
  m.def("abi_version() -> int", &abi_version);
  m.def(
      "linear_backward(Tensor dy, Tensor x, Tensor weight, Tensor? mask, Tensor? memory, "
      "Tensor(a!) hits, Tensor(b!) ref, int k, int selection, float alpha, bool count, "
      "bool has_bias, bool dense_bias, bool need_dx, bool need_dw, bool need_db, "
      "bool sparse_grad, Tensor(c!)[] grad_buffer) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mlp_forward(Tensor x, Tensor[] params, Tensor?[] masks, Tensor(a!)?[] memories, "
      "Tensor(b!)[] hits, Tensor(c!)[] refs, int[] ks, int[] selections, float[] alphas, "
      "int[] flags, float[] dropouts, Tensor(d!)[] grad_buffers) -> Tensor");
  m.def(
      "optimizer_step(int optimizer, Tensor(a!)[] params, Tensor[] grads, Tensor?[] hints, "
      "Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor(d!)[] steps, float[] hyper, "
      "bool lazy) -> ()");
  m.def(
      "mlp_train_step(Tensor x, Tensor y, Tensor(a!)[] params, Tensor?[] masks, "
      "Tensor(b!)?[] memories, Tensor(c!)[] hits, Tensor(d!)[] refs, int[] ks, "
      "int[] selections, float[] alphas, int[] flags, float[] dropouts, "
      "Tensor(e!)[] grad_buffers, int optimizer, Tensor(f!)[] state1, Tensor(g!)[] state2, "
      "Tensor(h!)[] steps, float[] hyper, bool lazy, bool check_grads) -> Tensor[]");
}

// CompositeExplicitAutograd: one kernel for dense and sparse (COO gradient) inputs; the
// Python callers run these under no_grad or inside an autograd Function's backward.
TORCH_LIBRARY_IMPL(mesimp, CompositeExplicitAutograd, m) {
  m.impl("linear_backward", &linear_backward);
  m.impl("mlp_forward", &mlp_forward);
  m.impl("optimizer_step", &optimizer_step);
  m.impl("mlp_train_step", &mlp_train_step);
}

TORCH_LIBRARY_IMPL(mesimp, Autograd, m) { m.impl("mlp_forward", &mlp_forward_autograd); }
