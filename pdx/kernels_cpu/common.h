// What pdx's CPU kernels share: one SIMD register V of L fp32 lanes, AVX-512 (16) where the CPU has
// it, else AVX2 with FMA (8), the few operations the kernels use (M: a lane mask), and a parallel
// loop over XLA's intra-op thread pool.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
constexpr int L = 16;
using V = __m512;
using M = __mmask16;
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vset(float a) { return _mm512_set1_ps(a); }
static inline V vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a); }
static inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
static inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
static inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V vround(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline M vless(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline V vzero_where(M m, V a) { return _mm512_maskz_mov_ps(~m, a); }
static inline V vpow2i(V n) {  // 2^n for integral n in [-127, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
static inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(V a) { return _mm512_reduce_max_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int L = 8;
using V = __m256;
using M = __m256;
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vset(float a) { return _mm256_set1_ps(a); }
static inline V vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a); }
static inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
static inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
static inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V vround(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline M vless(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
static inline V vzero_where(M m, V a) { return _mm256_andnot_ps(m, a); }
static inline V vpow2i(V n) {  // 2^n for integral n in [-127, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline float vsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vhmax(V a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "pdx's CPU kernels need AVX-512, or AVX2 with FMA"
#endif

// e^x in every lane (Cephes' expf: range reduction by ln 2 in two parts, a degree-5 polynomial;
// about 1 ulp); lanes below -87 give exactly 0, as a masked score must.
static inline V vexp(V x) {
  const V lo = vset(-87.0f);
  M under = vless(x, lo);
  x = vmin(vmax(x, lo), vset(88.0f));
  V n = vround(vmul(x, vset(1.44269504088896341f)));
  x = vfma(n, vset(-0.693359375f), x);
  x = vfma(n, vset(2.12194440e-4f), x);
  V p = vset(1.9875691500e-4f);
  p = vfma(p, x, vset(1.3981999507e-3f));
  p = vfma(p, x, vset(8.3334519073e-3f));
  p = vfma(p, x, vset(4.1665795894e-2f));
  p = vfma(p, x, vset(1.6666665459e-1f));
  p = vfma(p, x, vset(5.0000001201e-1f));
  p = vfma(p, vmul(x, x), vadd(x, vset(1.0f)));
  return vzero_where(under, vmul(p, vpow2i(n)));
}

// Runs fn(lo, hi) over [0, n) split into one contiguous range per thread of XLA's intra-op pool
// (at most n / grain ranges); the calling thread takes the first and waits for the rest.
template <class Fn>
static void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, Fn fn) {
  int64_t T = std::max<int64_t>(1, pool.num_threads());
  T = std::min<int64_t>(T, std::max<int64_t>(1, n / grain));
  std::atomic<int64_t> left(T - 1);
  int64_t per = (n + T - 1) / T;
  for (int64_t t = 1; t < T; ++t) {
    int64_t a = t * per, b = std::min(n, a + per);
    pool.Schedule([=, &left] { fn(a, b); left.fetch_sub(1, std::memory_order_release); });
  }
  fn(0, std::min(n, per));
  while (left.load(std::memory_order_acquire) > 0) _mm_pause();
}
