// Matrix-vector products with bf16 or int8 weights for XLA CPU: the FFI targets `pdx_gemv_bf16`
// (y = x @ w^T) and `pdx_gemv_int8` (y = (x @ q^T) * scale, one scale per output channel), with x fp32
// [R, K], the weight [N, K] (pdx's [out, in] layout) and y fp32 [R, N].
//
// XLA CPU has no fast bf16 or int8 gemv: its dot of a few rows, or an upcast weight, streams
// 1-2 GB/s, so decode read such weights as an fp32 copy. Here each weight row is read once, widened
// to fp32 in registers and multiplied into up to 4 rows of x with fp32 FMAs (AVX-512 or AVX2), the output
// rows split over XLA's intra-op thread pool. Built by `pdx.kernels_cpu.library`.

#include "common.h"

namespace ffi = xla::ffi;

// L weights widened to fp32 lanes.
struct Bf16 {  // a bf16 is the top half of an fp32
  using T = uint16_t;
#if defined(__AVX512F__)
  static inline V widen(const T* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
#else
  static inline V widen(const T* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
#endif
  static inline float one(T v) { return __builtin_bit_cast(float, uint32_t(v) << 16); }
};
struct Int8 {
  using T = int8_t;
#if defined(__AVX512F__)
  static inline V widen(const T* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
#else
  static inline V widen(const T* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
#endif
  static inline float one(T v) { return float(v); }
};

// y[r, n] = scale[n] * sum_k x[r, k] * w[n, k] for r in [0, RB): the weight row is read from memory
// once, widened L lanes at a time, and multiplied into RB rows of x.
template <class W, int RB>
static void block(const float* x, const typename W::T* wn, float scale, float* y, int64_t K, int64_t N) {
  V acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = vzero();
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V wv = W::widen(wn + k);
    for (int r = 0; r < RB; ++r) acc[r] = vfma(wv, vload(x + r * K + k), acc[r]);
  }
  for (int r = 0; r < RB; ++r) {
    float s = vsum(acc[r]);
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

template <class W>
static ffi::Error run(ffi::ThreadPool& pool, const float* xp, const typename W::T* wp, const float* sp, float* yp,
                      int64_t R, int64_t K, int64_t N) {
  parallel_for(pool, N, 64, [=](int64_t a, int64_t b) { rows<W>(xp, wp, sp, yp, R, K, N, a, b); });
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
