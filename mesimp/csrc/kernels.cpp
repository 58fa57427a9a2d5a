// Compiled meProp kernels (issue 15), registered with TORCH_LIBRARY as torch.ops.mesimp.*.
//
// The Python path (mesimp/nn/meprop.py) is the reference; these ops compute the same
// thing with less dispatch and bookkeeping:
//   linear_backward   one meProp Linear backward: selection, counters, MSBP memory,
//                     gathered GEMMs (ATen's BLAS), bias gradient, dense or COO dW
//   mlp_backward      the whole Linear-ReLU stack's backward in one call (one autograd
//                     node in Python, behind loss.backward())
//   lazy_adam_step    RowSparseAdam.step: gather the rows of row-sparse gradients, one
//                     torch._fused_adam_ over everything, scatter back (bit-identical)
//   mlp_train_step    forward, cross-entropy, backward and the lazy Adam step in one call
//
// Selection order: the k largest scores, ties broken by the lower index (a strict total
// order, so the selected set is unique), NaN counts as +inf (as torch.topk does); masked
// units score -1. Hot loops use GCC's target_clones (runtime dispatch AVX2/baseline) and
// -ffp-contract=off, so every ISA gives the same bits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using at::Tensor;

enum Selection : int64_t { kDense = 0, kUnified = 1, kTopk = 2 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MESIMP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MESIMP_CLONES
#endif

// score[j] = sum_i |u[i, j]|, rows accumulated in order
MESIMP_CLONES void abs_colsum(int64_t rows, int64_t n, const float* __restrict u,
                              float* __restrict score) {
  for (int64_t j = 0; j < n; ++j) score[j] = 0.f;
  for (int64_t i = 0; i < rows; ++i) {
    const float* r = u + i * n;
    for (int64_t j = 0; j < n; ++j) score[j] += std::fabs(r[j]);
  }
}

// dy[i] = 0 where the ReLU output h[i] <= 0 (threshold_backward)
MESIMP_CLONES void relu_mask(int64_t n, const float* __restrict h, float* __restrict g) {
  for (int64_t i = 0; i < n; ++i) g[i] = h[i] <= 0.f ? 0.f : g[i];
}

inline float key_of(float s) { return std::isnan(s) ? std::numeric_limits<float>::infinity() : s; }

// the k largest of key[0..n) (ties: lower index first), returned sorted ascending.
// A bound first: the k-th largest of B >= k block maxima is <= the k-th largest key (the
// top k maxima are k distinct keys), so only keys >= it can be selected; the exact order
// runs on those few candidates. ~4x faster than nth_element over all n at n=500, k=20.
void top_indices(const float* key, int64_t n, int64_t k, std::vector<int64_t>& idx,
                 std::vector<float>& bmax) {
  auto better = [key](int64_t a, int64_t b) {
    return key[a] > key[b] || (key[a] == key[b] && a < b);
  };
  if (k >= n) {
    idx.resize(n);
    std::iota(idx.begin(), idx.end(), 0);
    return;
  }
  const int64_t B = std::min(n, 2 * k);
  idx.clear();
  if (B * 2 > n) {  // blocks too small to help
    idx.resize(n);
    std::iota(idx.begin(), idx.end(), 0);
  } else {
    bmax.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t lo = b * n / B, hi = (b + 1) * n / B;
      float m = key[lo];
      for (int64_t j = lo + 1; j < hi; ++j) m = key[j] > m ? key[j] : m;
      bmax[b] = m;
    }
    std::nth_element(bmax.begin(), bmax.begin() + (k - 1), bmax.end(), std::greater<float>());
    const float t = bmax[k - 1];
    for (int64_t j = 0; j < n; ++j)
      if (key[j] >= t) idx.push_back(j);
  }
  if ((int64_t)idx.size() > k) {
    std::nth_element(idx.begin(), idx.begin() + k, idx.end(), better);
    idx.resize(k);
  }
  std::sort(idx.begin(), idx.end());
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

Tensor make_weight_grad(const Tensor& rows_w, const Tensor& sel, at::IntArrayRef shape,
                        bool sparse_grad) {
  if (sparse_grad) {
    Tensor g = at::_sparse_coo_tensor_unsafe(sel.unsqueeze(0), rows_w, shape, rows_w.options());
    g._coalesced_(true);
    return g;
  }
  return at::zeros(shape, rows_w.options()).index_copy_(0, sel, rows_w);
}

// The per-example top-k backward's working arrays, kept between calls.
struct TopkScratch {
  std::vector<int64_t> idx, counts, start, pos, uni, fill, ex;
  std::vector<float> vals, key, ev;
  std::vector<const float*> rows;
  RowScratch row;
};

struct LayerGrads {
  Tensor dx, dw, db, memory;
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

// One layer's meProp backward; dy [N, n] float32 contiguous, x [N, d], weight [n, d].
LayerGrads layer_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                          const std::optional<Tensor>& mask, const std::optional<Tensor>& memory,
                          const Tensor& hits, const Tensor& ref, const LayerArgs& a,
                          bool need_dx, bool need_dw, bool need_db) {
  LayerGrads out;
  const int64_t N = dy.size(0), n = dy.size(1), d = x.size(1);
  if (a.selection == kDense) {  // a plain (masked) Linear: dense gradients, no counting
    Tensor g = mask.has_value() ? dy * *mask : dy;
    if (need_dx) out.dx = g.mm(weight);
    if (need_dw) out.dw = g.t().mm(x);
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
    abs_colsum(N, n, up, score.data());
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
    if (need_dx) out.dx = u_sel.mm(weight.index_select(0, sel));
    if (need_dw) out.dw = make_weight_grad(u_sel.t().mm(xc), sel, weight.sizes(), a.sparse_grad);
    if (need_db && a.has_bias && !a.dense_bias)
      out.db = at::zeros({n}, u.options()).index_copy_(0, sel, u_sel.sum(0));
  } else {  // per-example top-k: b*k*d work for dx and dW
    const int64_t k = a.k;
    TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "mesimp kernels: layer too wide");
    // scratch reused across calls (one set per thread): no per-call allocations
    thread_local TopkScratch sc;
    sc.idx.resize(N * k);
    sc.vals.resize(N * k);
    sc.key.resize(n);
    sc.counts.assign(n, 0);
    std::vector<int64_t>& idx = sc.idx;
    std::vector<float>& vals = sc.vals;
    std::vector<int64_t>& counts = sc.counts;
    float* key = sc.key.data();
    for (int64_t i = 0; i < N; ++i) {
      const float* r = up + i * n;
      for (int64_t j = 0; j < n; ++j) key[j] = (mp && !mp[j]) ? -1.f : key_of(std::fabs(r[j]));
      int64_t* row = &idx[i * k];
      row_top_indices(key, n, k, row, sc.row);
      for (int64_t t = 0; t < k; ++t) {
        vals[i * k + t] = r[row[t]];
        counts[row[t]] += 1;
      }
    }
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
    std::vector<int64_t>&start = sc.start, &pos = sc.pos, &uni = sc.uni;
    start.assign(n + 1, 0);
    pos.assign(n, -1);
    uni.clear();
    for (int64_t j = 0; j < n; ++j) {
      start[j + 1] = start[j] + counts[j];
      if (counts[j] > 0) {
        pos[j] = (int64_t)uni.size();
        uni.push_back(j);
      }
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
    Tensor dx, dwt;
    std::vector<const float*>& rows = sc.rows;
    rows.resize(std::max<int64_t>(N, k));
    if (need_dx) {  // dx[i] = sum_t vals[i, t] W[idx[i, t]], one example at a time
      dx = at::empty({N, d}, u.options());  // every row written whole
      float* dxp = dx.data_ptr<float>();
      for (int64_t i = 0; i < N; ++i) {
        for (int64_t t = 0; t < k; ++t) rows[t] = wp + idx[i * k + t] * d;
        weighted_rows_sum(d, k, rows.data(), &vals[i * k], dxp + i * d);
      }
    }
    const bool sparse_rows = a.sparse_grad;
    if (need_dw) {  // dW[j] = sum over the entries that selected j of val * x[example]
      // row-sparse: [|U|, d], every row written whole; dense: zero only the rows not in U
      dwt = at::empty({sparse_rows ? (int64_t)uni.size() : n, d}, u.options());
      float* dwp = dwt.data_ptr<float>();
      if (!sparse_rows)
        for (int64_t j = 0; j < n; ++j)
          if (counts[j] == 0) std::fill(dwp + j * d, dwp + (j + 1) * d, 0.f);
      for (int64_t j : uni) {
        const int64_t m = start[j + 1] - start[j];
        for (int64_t e = 0; e < m; ++e) rows[e] = xp + ex[start[j] + e] * d;
        weighted_rows_sum(d, m, rows.data(), &ev[start[j]], dwp + (sparse_rows ? pos[j] : j) * d);
      }
    }
    if (need_dx) out.dx = dx;
    if (need_dw)
      out.dw = sparse_rows ? make_weight_grad(dwt, index_tensor(uni), weight.sizes(), true) : dwt;
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
    bool need_dw, bool need_db, bool sparse_grad) {
  check_cpu_float(dy, "dy");
  check_cpu_float(x, "x");
  check_cpu_float(weight, "weight");
  TORCH_CHECK(selection == kUnified || selection == kTopk, "mesimp kernels: bad selection");
  TORCH_CHECK(k >= 1 && k <= dy.size(1), "mesimp kernels: k out of range");
  LayerArgs a{k, selection, alpha, count, has_bias, dense_bias, sparse_grad};
  LayerGrads g = layer_backward(dy.contiguous(), x, weight, mask, memory, hits, ref, a, need_dx,
                                need_dw, need_db);
  return {g.dx, g.dw, g.db, g.memory};
}

struct Stack {
  std::vector<LayerArgs> args;
  std::vector<std::optional<Tensor>> masks, memories;
};

Stack make_stack(const c10::List<std::optional<Tensor>>& masks,
                 const c10::List<std::optional<Tensor>>& memories, at::IntArrayRef ks,
                 at::IntArrayRef selections, at::ArrayRef<double> alphas, at::IntArrayRef flags,
                 size_t L) {
  TORCH_CHECK(masks.size() == L && memories.size() == L && ks.size() == L &&
                  selections.size() == L && alphas.size() == L && flags.size() == L,
              "mesimp kernels: per-layer lists of different lengths");
  Stack s;
  for (size_t l = 0; l < L; ++l) {
    LayerArgs a;
    a.k = ks[l];
    a.selection = selections[l];
    a.alpha = alphas[l];
    // flags: bit 0 count, bit 1 has_bias, bit 2 dense_bias, bit 3 sparse_grad
    a.count = flags[l] & 1;
    a.has_bias = flags[l] & 2;
    a.dense_bias = flags[l] & 4;
    a.sparse_grad = flags[l] & 8;
    s.args.push_back(a);
    s.masks.push_back(masks.get(l));
    s.memories.push_back(memories.get(l));
  }
  return s;
}

// Backward of h_{l+1} = relu((h_l W_l^T + b_l) * mask_l) (no ReLU after the last layer).
// xs[l] is layer l's input (xs[l+1] its ReLU output). Returns [dx0, (dW, db, memory) * L].
std::vector<Tensor> stack_backward(Tensor dout, at::TensorList xs, at::TensorList weights,
                                   const Stack& s, at::TensorList hits, at::TensorList refs,
                                   bool need_dx0) {
  const size_t L = weights.size();
  std::vector<Tensor> out(1 + 3 * L);
  Tensor dy = dout.contiguous();
  for (size_t li = L; li-- > 0;) {
    const bool need_dx = li > 0 || need_dx0;
    LayerGrads g = layer_backward(dy, xs[li], weights[li], s.masks[li], s.memories[li], hits[li],
                                  refs[li], s.args[li], need_dx, true, true);
    out[1 + 3 * li] = g.dw;
    out[2 + 3 * li] = g.db;
    out[3 + 3 * li] = g.memory;
    if (li > 0) {
      dy = g.dx.contiguous();
      const Tensor h = xs[li].contiguous();
      relu_mask(dy.numel(), h.data_ptr<float>(), dy.data_ptr<float>());
    } else {
      out[0] = g.dx;
    }
  }
  return out;
}

std::vector<Tensor> mlp_backward(const Tensor& dout, at::TensorList xs, at::TensorList weights,
                                 const c10::List<std::optional<Tensor>>& masks,
                                 const c10::List<std::optional<Tensor>>& memories,
                                 at::TensorList hits, at::TensorList refs, at::IntArrayRef ks,
                                 at::IntArrayRef selections, at::ArrayRef<double> alphas,
                                 at::IntArrayRef flags, bool need_dx0) {
  const size_t L = weights.size();
  TORCH_CHECK(xs.size() == L && hits.size() == L && refs.size() == L,
              "mesimp kernels: per-layer lists of different lengths");
  check_cpu_float(dout, "dout");
  for (size_t l = 0; l < L; ++l) {
    check_cpu_float(xs[l], "layer input");
    check_cpu_float(weights[l], "weight");
  }
  Stack s = make_stack(masks, memories, ks, selections, alphas, flags, L);
  return stack_backward(dout, xs, weights, s, hits, refs, need_dx0);
}

// RowSparseAdam.step for one param group: dense gradients step whole; row-sparse (COO,
// coalesced) ones gather their rows from the param and both moments, step together with
// the dense ones in one _fused_adam_, and scatter back.
void adam_update(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> ms,
                 std::vector<Tensor> vs, at::TensorList steps, double lr, double beta1,
                 double beta2, double eps) {
  struct Scatter {
    Tensor p, m, v, rows, pr, mr, vr;
  };
  std::vector<Scatter> scatter;
  for (size_t i = 0; i < params.size(); ++i) {
    Tensor& g = grads[i];
    if (!g.is_sparse()) continue;
    Tensor rows = g._indices().select(0, 0);
    if (!g.is_coalesced()) {  // autograd drops the flag: re-sort only if really unsorted
      Tensor r = rows.contiguous();
      const int64_t* rp = r.data_ptr<int64_t>();
      bool sorted = true;
      for (int64_t i = 1; i < r.numel() && sorted; ++i) sorted = rp[i - 1] < rp[i];
      if (!sorted) {
        g = g.coalesce();
        rows = g._indices().select(0, 0);
      }
    }
    Scatter s{params[i], ms[i], vs[i], rows, params[i].index_select(0, rows),
              ms[i].index_select(0, rows), vs[i].index_select(0, rows)};
    params[i] = s.pr;
    ms[i] = s.mr;
    vs[i] = s.vr;
    g = g._values();
    scatter.push_back(std::move(s));
  }
  at::_foreach_add_(steps, 1);
  at::_fused_adam_(params, grads, ms, vs, {}, steps, lr, beta1, beta2, 0.0, eps, false, false);
  for (auto& s : scatter) {
    s.p.index_copy_(0, s.rows, s.pr);
    s.m.index_copy_(0, s.rows, s.mr);
    s.v.index_copy_(0, s.rows, s.vr);
  }
}

void lazy_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                    double beta2, double eps) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == exp_avgs.size() &&
                  params.size() == exp_avg_sqs.size() && params.size() == steps.size(),
              "mesimp kernels: lazy_adam_step lists of different lengths");
  if (params.empty()) return;
  at::NoGradGuard no_grad;
  adam_update(params.vec(), grads.vec(), exp_avgs.vec(), exp_avg_sqs.vec(), steps, lr, beta1,
              beta2, eps);
}

// One training step of the Linear-ReLU stack with mean cross-entropy and the lazy Adam:
// the same ops as forward + F.cross_entropy + loss.backward() + RowSparseAdam.step().
// params = [W0, b0, W1, b1, ...] (biases present per flags bit 1). Returns
// [loss, bad, memory_0, ..., memory_{L-1}]: bad = -1, or the index in params of a
// non-finite gradient (checked when check_grads); a non-finite loss or gradient leaves
// the parameters and the optimizer state untouched.
std::vector<Tensor> mlp_train_step(const Tensor& x, const Tensor& y, at::TensorList params,
                                   const c10::List<std::optional<Tensor>>& masks,
                                   const c10::List<std::optional<Tensor>>& memories,
                                   at::TensorList hits, at::TensorList refs, at::IntArrayRef ks,
                                   at::IntArrayRef selections, at::ArrayRef<double> alphas,
                                   at::IntArrayRef flags, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                                   double beta1, double beta2, double eps, bool check_grads) {
  at::NoGradGuard no_grad;
  const size_t L = hits.size();
  Stack s = make_stack(masks, memories, ks, selections, alphas, flags, L);
  std::vector<Tensor> weights, biases;
  size_t pi = 0;
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(pi < params.size(), "mesimp kernels: too few params");
    weights.push_back(params[pi++]);
    if (s.args[l].has_bias) {
      TORCH_CHECK(pi < params.size(), "mesimp kernels: too few params");
      biases.push_back(params[pi++]);
    } else {
      biases.emplace_back();
    }
  }
  TORCH_CHECK(pi == params.size() && exp_avgs.size() == pi && exp_avg_sqs.size() == pi &&
                  steps.size() == pi,
              "mesimp kernels: params and optimizer state do not match the layers");
  check_cpu_float(x, "x");
  // forward: what MePropLinear / nn.Linear / nn.ReLU compute
  std::vector<Tensor> xs{x};
  Tensor h = x;
  for (size_t l = 0; l < L; ++l) {
    const Tensor& W = weights[l];
    Tensor o = biases[l].defined() ? at::addmm(biases[l], h, W.t()) : h.mm(W.t());
    if (s.masks[l].has_value()) o.mul_(*s.masks[l]);
    if (l + 1 < L) {
      o.relu_();
      xs.push_back(o);
    }
    h = o;
  }
  // F.cross_entropy(logits, y) and its backward, as autograd runs them
  Tensor logp = at::_log_softmax(h, 1, false);
  auto [loss, total_weight] = at::nll_loss_forward(logp, y, {}, at::Reduction::Mean, -100);
  std::vector<Tensor> out{loss, at::full({}, -1, at::kLong)};
  if (!std::isfinite(loss.item<float>())) {
    for (size_t l = 0; l < L; ++l) out.push_back(s.memories[l].value_or(Tensor()));
    return out;
  }
  Tensor gl = at::nll_loss_backward(at::ones_like(loss), logp, y, {}, at::Reduction::Mean, -100,
                                    total_weight);
  Tensor dlogits = at::_log_softmax_backward_data(gl, logp, 1, at::kFloat);
  std::vector<Tensor> g = stack_backward(dlogits, xs, weights, s, hits, refs, false);
  std::vector<Tensor> grads;
  for (size_t l = 0; l < L; ++l) {
    grads.push_back(g[1 + 3 * l]);
    if (s.args[l].has_bias) grads.push_back(g[2 + 3 * l]);
  }
  for (size_t l = 0; l < L; ++l) out.push_back(g[3 + 3 * l]);
  if (check_grads) {
    for (size_t i = 0; i < grads.size(); ++i) {
      Tensor v = grads[i].is_sparse() ? grads[i]._values() : grads[i];
      if (!at::isfinite(v).all().item<bool>()) {
        out[1].fill_(static_cast<int64_t>(i));
        return out;
      }
    }
  }
  adam_update(params.vec(), grads, exp_avgs.vec(), exp_avg_sqs.vec(), steps, lr, beta1, beta2, eps);
  return out;
}

}  // namespace

TORCH_LIBRARY(mesimp, m) {
  m.def(
      "linear_backward(Tensor dy, Tensor x, Tensor weight, Tensor? mask, Tensor? memory, "
      "Tensor(a!) hits, Tensor(b!) ref, int k, int selection, float alpha, bool count, "
      "bool has_bias, bool dense_bias, bool need_dx, bool need_dw, bool need_db, "
      "bool sparse_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mlp_backward(Tensor dout, Tensor[] xs, Tensor[] weights, Tensor?[] masks, "
      "Tensor?[] memories, Tensor(a!)[] hits, Tensor(b!)[] refs, int[] ks, int[] selections, "
      "float[] alphas, int[] flags, bool need_dx0) -> Tensor[]");
  m.def(
      "lazy_adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, "
      "float eps) -> ()");
  m.def(
      "mlp_train_step(Tensor x, Tensor y, Tensor(a!)[] params, Tensor?[] masks, "
      "Tensor?[] memories, Tensor(b!)[] hits, Tensor(c!)[] refs, int[] ks, int[] selections, "
      "float[] alphas, int[] flags, Tensor(d!)[] exp_avgs, Tensor(e!)[] exp_avg_sqs, "
      "Tensor(f!)[] steps, float lr, float beta1, float beta2, float eps, bool check_grads) "
      "-> Tensor[]");
}

// CompositeExplicitAutograd: one kernel for dense and sparse (COO gradient) inputs; the
// Python callers run these under no_grad or inside an autograd Function's backward.
TORCH_LIBRARY_IMPL(mesimp, CompositeExplicitAutograd, m) {
  m.impl("linear_backward", &linear_backward);
  m.impl("mlp_backward", &mlp_backward);
  m.impl("lazy_adam_step", &lazy_adam_step);
  m.impl("mlp_train_step", &mlp_train_step);
}
