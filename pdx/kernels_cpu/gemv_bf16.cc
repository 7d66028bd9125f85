// bf16-weight matrix-vector products for XLA CPU, registered as the FFI target `pdx_gemv_bf16`.
//
// y[r, n] = sum_k x[r, k] * w[n, k] with x fp32 [R, K], w bf16 [N, K] (pdx's [out, in] layout), y fp32.
// XLA CPU has no fast bf16 gemv: its bf16 dot with one row, or an upcast weight, streams 1-2 GB/s,
// so decode read bf16 weights as an fp32 copy. Here each weight row is read once, widened to fp32 in
// registers (a bf16 is the top half of an fp32) and multiplied into up to 4 rows of x with fp32
// FMAs, the output rows split over XLA's intra-op thread pool. Built by `pdx.kernels_cpu.gemv`.
#include <immintrin.h>
#include <atomic>
#include <cstdint>
#include <algorithm>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

// y[r, n] = sum_k x[r, k] * w[n, k] for n in [n0, n1); w is bf16 (the top half of an fp32).
// Each weight row is read from memory once and widened once, then multiplied into up to 4 rows of x.
static inline __m512 widen(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
template <int RB>
static void block_bf16(const float* x, const uint16_t* wn, float* y, int64_t K, int64_t N) {
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv = widen(wn + k);
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k), acc[r]);
  }
  for (int r = 0; r < RB; ++r) {
    float s = _mm512_reduce_add_ps(acc[r]);
    for (int64_t j = k; j < K; ++j) s += x[r * K + j] * __builtin_bit_cast(float, uint32_t(wn[j]) << 16);
    y[r * N] = s;
  }
}
static void rows_bf16(const float* x, const uint16_t* w, float* y, int64_t R, int64_t K, int64_t N,
                      int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wn = w + n * K;
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) block_bf16<4>(x + r * K, wn, y + r * N + n, K, N);
    switch (R - r) {
      case 3: block_bf16<3>(x + r * K, wn, y + r * N + n, K, N); break;
      case 2: block_bf16<2>(x + r * K, wn, y + r * N + n, K, N); break;
      case 1: block_bf16<1>(x + r * K, wn, y + r * N + n, K, N); break;
    }
  }
}

// The output rows [0, N) are split into one contiguous range per pool thread; the caller takes the first.
static ffi::Error GemvBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                          ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(); auto wd = w.dimensions();
  int64_t K = xd.back(), R = x.element_count() / K, N = wd[0];
  if (wd.size() != 2 || wd[1] != K) return ffi::Error::InvalidArgument("pdx_gemv_bf16: w must be [N, K] with x [..., K]");
  const float* xp = x.typed_data(); const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();
  int64_t T = std::max<int64_t>(1, pool.num_threads());
  T = std::min<int64_t>(T, std::max<int64_t>(1, N / 64));
  std::atomic<int64_t> left(T - 1);
  int64_t per = (N + T - 1) / T;
  for (int64_t t = 1; t < T; ++t) {
    int64_t a = t * per, b = std::min(N, a + per);
    pool.Schedule([=, &left] { rows_bf16(xp, wp, yp, R, K, N, a, b); left.fetch_sub(1, std::memory_order_release); });
  }
  rows_bf16(xp, wp, yp, R, K, N, 0, std::min(N, per));
  while (left.load(std::memory_order_acquire) > 0) _mm_pause();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(pdx_gemv_bf16, GemvBf16,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::BF16>>().Ret<ffi::Buffer<ffi::F32>>());
