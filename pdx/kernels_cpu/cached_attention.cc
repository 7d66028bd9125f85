// Attention over a KV cache for XLA CPU: the FFI target `pdx_cached_attention`. P queries, each of
// one cache row, already written into that row at slot = its position (a decode step's one token
// per row, a prefill chunk's tokens, or tokens of several rows packed into one sequence).
// q [P, N, H]; k and v [B, K, S, H] (K kv heads, N = G * K query heads), all fp32; rows, q_pos,
// starts [P] int32; live [B] int32; window [] int32 (0: none) -> out [P, N, H] fp32.
//
// Query p sees slot s of row rows[p] iff starts[p] <= s < live[rows[p]], s <= q_pos[p] and, with a
// window, q_pos[p] - s < window. XLA's jnp attention reads every slot of the cache, live or not,
// and the cached keys once per query head; here each (query, kv head) reads only its visible slots,
// once, for the G heads that share them: scores, a softmax with a vector exp, then the weighted sum
// of values. The (query, kv head) pairs are split over XLA's intra-op thread pool.

#include <cmath>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;

// Scratch of one thread, grown as needed and reused across calls (no allocation per query).
struct Scratch {
  std::vector<float> qs, scores, acc, total;
};

static void attend_one(const float* q, const float* k, const float* v, float* out, int64_t G, int64_t H,
                       int64_t lo, int64_t hi, Scratch& w) {
  const int64_t n = hi - lo, np = (n + L - 1) / L * L;  // visible slots, padded to whole registers
  const float scale = 1.0f / std::sqrt(float(H));
  w.qs.resize(G * H);
  w.scores.assign(G * np, -1e30f);
  w.acc.assign(G * H, 0.0f);
  w.total.resize(G);
  float *qs = w.qs.data(), *scores = w.scores.data(), *acc = w.acc.data();
  for (int64_t i = 0; i < G * H; ++i) qs[i] = q[i] * scale;
  for (int64_t s = 0; s < n; ++s) {  // scores[g, s] = q_g . k_s
    const float* ks = k + (lo + s) * H;
    for (int64_t g = 0; g < G; ++g) {
      V a = vzero();
      for (int64_t c = 0; c < H; c += L) a = vfma(vload(qs + g * H + c), vload(ks + c), a);
      scores[g * np + s] = vsum(a);
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax numerators in place; the padding's exp is 0
    float* row = scores + g * np;
    V m = vset(-1e30f);
    for (int64_t s = 0; s < np; s += L) m = vmax(m, vload(row + s));
    V neg_max = vset(-vhmax(m)), t = vzero();
    for (int64_t s = 0; s < np; s += L) {
      V p = vexp(vadd(vload(row + s), neg_max));
      vstore(row + s, p);
      t = vadd(t, p);
    }
    w.total[g] = vsum(t);
  }
  for (int64_t s = 0; s < n; ++s) {  // acc[g] += p[g, s] * v_s
    const float* vs = v + (lo + s) * H;
    for (int64_t c = 0; c < H; c += L) {
      V vv = vload(vs + c);
      for (int64_t g = 0; g < G; ++g) {
        float* a = acc + g * H + c;
        vstore(a, vfma(vset(scores[g * np + s]), vv, vload(a)));
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < H; ++c) out[g * H + c] = acc[g * H + c] / w.total[g];
}

static ffi::Error CachedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> q_pos,
                                  ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> live,
                                  ffi::Buffer<ffi::S32> window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || kd[3] != qd[2] || qd[1] % kd[1] != 0 || v.dimensions() != kd ||
      rows.element_count() != qd[0] || q_pos.element_count() != qd[0] || starts.element_count() != qd[0] ||
      live.element_count() != kd[0] || qd[2] % L != 0)
    return ffi::Error::InvalidArgument(
        "pdx_cached_attention: q [P, N, H], k, v [B, K, S, H], rows, q_pos, starts [P], live [B], H % L == 0");
  const int64_t P = qd[0], N = qd[1], H = qd[2], B = kd[0], K = kd[1], S = kd[2], G = N / K;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *row = rows.typed_data(), *pos = q_pos.typed_data(), *first = starts.typed_data();
  const int32_t *lv = live.typed_data();
  const int32_t w = window.typed_data()[0];
  float* op = out->typed_data();
  const int64_t n = P * K;
  parallel_for(pool, n, 1, [=](int64_t a, int64_t e) {
    thread_local Scratch scratch;
    for (int64_t j = a; j < e; ++j) {
      // Item j of the pairs (p, kv head) ordered 0, n-1, 1, n-2, ...: a thread's contiguous range
      // takes early and late queries alike, whose causal spans differ most (one prompt's prefill).
      const int64_t i = j % 2 == 0 ? j / 2 : n - 1 - j / 2;
      const int64_t p = i / K, kh = i % K;
      float* o = op + (p * N + kh * G) * H;
      const int64_t b = row[p];
      if (b < 0 || b >= B) {  // a query of no row (padding): zeros
        std::fill(o, o + G * H, 0.0f);
        continue;
      }
      int64_t hi = std::min<int64_t>({lv[b], int64_t(pos[p]) + 1, S});
      int64_t lo = std::max<int64_t>(0, first[p]);
      if (w > 0) lo = std::max<int64_t>(lo, int64_t(pos[p]) - w + 1);
      if (hi <= lo) {  // nothing visible: zeros
        std::fill(o, o + G * H, 0.0f);
        continue;
      }
      const int64_t base = (b * K + kh) * S * H;
      attend_one(qp + (p * N + kh * G) * H, kp + base, vp + base, o, G, H, lo, hi, scratch);
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(pdx_cached_attention, CachedAttention,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()
        .Ret<ffi::Buffer<ffi::F32>>());
