// Matrix-vector products with bf16 or int8 weights for XLA CPU: the FFI targets `pdx_gemv_bf16`
// (y = x @ w^T) and `pdx_gemv_int8` (y = (x @ q^T) * scale, one scale per output channel), with x fp32
// [R, K], the weight [N, K] (pdx's [out, in] layout) and y fp32 [R, N].
//
// XLA CPU has no fast bf16 or int8 gemv: its dot of a few rows, or an upcast weight, streams
// 1-2 GB/s, so decode read such weights as an fp32 copy. Here each weight row is read once, widened
// to fp32 in registers and multiplied into up to 4 rows of x with fp32 FMAs (AVX-512), the output
// rows split over XLA's intra-op thread pool. Built by `pdx.kernels_cpu.gemv`.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// y[r, n] = scale[n] * sum_k x[r, k] * w[n, k] for n in [n0, n1). Each weight row is read from
// memory once and widened to fp32 16 lanes at a time, then multiplied into up to 4 rows of x.
struct Bf16 {  // a bf16 is the top half of an fp32
  using T = uint16_t;
  static inline __m512 widen(const T* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static inline float one(T v) { return __builtin_bit_cast(float, uint32_t(v) << 16); }
};
struct Int8 {
  using T = int8_t;
  static inline __m512 widen(const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }
  static inline float one(T v) { return float(v); }
};

template <class W, int RB>
static void block(const float* x, const typename W::T* wn, float scale, float* y, int64_t K, int64_t N) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv = W::widen(wn + k);
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k), acc[r]);
  }
  for (int r = 0; r < RB; ++r) {
    float s = _mm512_reduce_add_ps(acc[r]);
    for (int64_t j = k; j < K; ++j) s += x[r * K + j] * W::one(wn[j]);
    y[r * N] = s * scale;
  }
}

template <class W>
static void rows(const float* x, const typename W::T* w, const float* scale, float* y, int64_t R, int64_t K,
                 int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const typename W::T* wn = w + n * K;
    float sc = scale ? scale[n] : 1.0f;
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) block<W, 4>(x + r * K, wn, sc, y + r * N + n, K, N);
    switch (R - r) {
      case 3: block<W, 3>(x + r * K, wn, sc, y + r * N + n, K, N); break;
      case 2: block<W, 2>(x + r * K, wn, sc, y + r * N + n, K, N); break;
      case 1: block<W, 1>(x + r * K, wn, sc, y + r * N + n, K, N); break;
    }
  }
}

// The output rows [0, N) are split into one contiguous range per pool thread; the caller takes the first.
template <class W>
static ffi::Error run(ffi::ThreadPool& pool, const float* xp, const typename W::T* wp, const float* sp, float* yp,
                      int64_t R, int64_t K, int64_t N) {
  int64_t T = std::max<int64_t>(1, pool.num_threads());
  T = std::min<int64_t>(T, std::max<int64_t>(1, N / 64));
  std::atomic<int64_t> left(T - 1);
  int64_t per = (N + T - 1) / T;
  for (int64_t t = 1; t < T; ++t) {
    int64_t a = t * per, b = std::min(N, a + per);
    pool.Schedule([=, &left] { rows<W>(xp, wp, sp, yp, R, K, N, a, b); left.fetch_sub(1, std::memory_order_release); });
  }
  rows<W>(xp, wp, sp, yp, R, K, N, 0, std::min(N, per));
  while (left.load(std::memory_order_acquire) > 0) _mm_pause();
  return ffi::Error::Success();
}

static ffi::Error GemvBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                          ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  int64_t K = x.dimensions().back(), R = x.element_count() / K;
  if (wd.size() != 2 || wd[1] != K) return ffi::Error::InvalidArgument("pdx_gemv_bf16: w must be [N, K] with x [..., K]");
  return run<Bf16>(pool, x.typed_data(), reinterpret_cast<const uint16_t*>(w.typed_data()), nullptr,
                   y->typed_data(), R, K, wd[0]);
}

static ffi::Error GemvInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto qd = q.dimensions();
  int64_t K = x.dimensions().back(), R = x.element_count() / K;
  if (qd.size() != 2 || qd[1] != K || scale.element_count() != qd[0])
    return ffi::Error::InvalidArgument("pdx_gemv_int8: q must be [N, K] with x [..., K] and scale [N]");
  return run<Int8>(pool, x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), R, K, qd[0]);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(pdx_gemv_bf16, GemvBf16,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::BF16>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(pdx_gemv_int8, GemvInt8,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S8>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
