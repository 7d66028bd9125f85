// Decode attention for XLA CPU: the FFI target `pdx_decode_attention`, one new query per row over a
// KV cache that already holds it. q [B, N, H], k and v [B, K, S, H] (K kv heads, N = G * K query
// heads), all fp32; q_pos, live [B] int32; window [] int32 (0: none) -> out [B, N, H] fp32.
//
// Row b's query (at q_pos[b]) sees slot s iff s < live[b], s <= q_pos[b] and, with a window,
// q_pos[b] - s < window: a causal decode step. XLA's jnp attention reads every slot of the cache,
// live or not, and the cached keys once per query head; here each (row, kv head) reads only its
// visible slots, once, for all G heads that share them: scores, a softmax with a vector exp, then
// the weighted sum of values. The (row, kv head) pairs are split over XLA's intra-op thread pool.

#include <cmath>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;

static void attend_one(const float* q, const float* k, const float* v, float* out, int64_t G, int64_t S,
                       int64_t H, int64_t lo, int64_t hi) {
  const int64_t n = hi - lo, np = (n + L - 1) / L * L;  // visible slots, padded to whole registers
  const float scale = 1.0f / std::sqrt(float(H));
  std::vector<float> qs(G * H), scores(G * np, -1e30f), acc(G * H, 0.0f);
  for (int64_t i = 0; i < G * H; ++i) qs[i] = q[i] * scale;
  for (int64_t s = 0; s < n; ++s) {  // scores[g, s] = q_g . k_s
    const float* ks = k + (lo + s) * H;
    for (int64_t g = 0; g < G; ++g) {
      V a = vzero();
      for (int64_t c = 0; c < H; c += L) a = vfma(vload(qs.data() + g * H + c), vload(ks + c), a);
      scores[g * np + s] = vsum(a);
    }
  }
  std::vector<float> total(G);
  for (int64_t g = 0; g < G; ++g) {  // softmax numerators in place; the padding's exp is 0
    float* row = scores.data() + g * np;
    V m = vset(-1e30f);
    for (int64_t s = 0; s < np; s += L) m = vmax(m, vload(row + s));
    V neg_max = vset(-vhmax(m)), t = vzero();
    for (int64_t s = 0; s < np; s += L) {
      V p = vexp(vadd(vload(row + s), neg_max));
      vstore(row + s, p);
      t = vadd(t, p);
    }
    total[g] = vsum(t);
  }
  for (int64_t s = 0; s < n; ++s) {  // acc[g] += p[g, s] * v_s
    const float* vs = v + (lo + s) * H;
    for (int64_t c = 0; c < H; c += L) {
      V vv = vload(vs + c);
      for (int64_t g = 0; g < G; ++g) {
        float* a = acc.data() + g * H + c;
        vstore(a, vfma(vset(scores[g * np + s]), vv, vload(a)));
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < H; ++c) out[g * H + c] = acc[g * H + c] / total[g];
}

static ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> live,
                                  ffi::Buffer<ffi::S32> window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || kd[0] != qd[0] || kd[3] != qd[2] || qd[1] % kd[1] != 0 ||
      v.dimensions() != kd || q_pos.element_count() != qd[0] || live.element_count() != qd[0] || qd[2] % L != 0)
    return ffi::Error::InvalidArgument("pdx_decode_attention: q [B, N, H], k, v [B, K, S, H], q_pos, live [B], H % L == 0");
  const int64_t B = qd[0], N = qd[1], H = qd[2], K = kd[1], S = kd[2], G = N / K;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *pos = q_pos.typed_data(), *lv = live.typed_data();
  const int32_t w = window.typed_data()[0];
  float* op = out->typed_data();
  parallel_for(pool, B * K, 1, [=](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      const int64_t b = i / K, kh = i % K;
      int64_t hi = std::min<int64_t>({lv[b], int64_t(pos[b]) + 1, S});
      int64_t lo = w > 0 ? std::max<int64_t>(0, int64_t(pos[b]) - w + 1) : 0;
      float* o = op + (b * N + kh * G) * H;
      if (hi <= lo) {  // nothing visible (never in a decode step): zeros
        std::fill(o, o + G * H, 0.0f);
        continue;
      }
      const int64_t base = (b * K + kh) * S * H;
      attend_one(qp + (b * N + kh * G) * H, kp + base, vp + base, o, G, S, H, lo, hi);
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(pdx_decode_attention, DecodeAttention,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::Buffer<ffi::F32>>());
