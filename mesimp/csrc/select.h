// Shared by kernels.cpp and lstm_kernels.cpp: the runtime ISA dispatch macro and the
// unified selection (the k largest scores; ties to the lower index, NaN as +inf).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

// MESIMP_NO_CLONES builds the baseline ISA only: tests/test_isa_bits.py compares its bits
// with the dispatched build's.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MESIMP_NO_CLONES)
#define MESIMP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MESIMP_CLONES
#endif

namespace mesimp_select {

inline float key_of(float s) { return std::isnan(s) ? std::numeric_limits<float>::infinity() : s; }

// The k largest of key[0..n) (ties: lower index first), returned sorted ascending.
// A bound first: the k-th largest of B >= k block maxima is <= the k-th largest key (the
// top k maxima are k distinct keys), so only keys >= it can be selected; the exact order
// runs on those few candidates. ~4x faster than nth_element over all n at n=500, k=20.
inline void top_indices(const float* key, int64_t n, int64_t k, std::vector<int64_t>& idx,
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

}  // namespace mesimp_select
