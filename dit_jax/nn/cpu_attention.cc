// Flash attention for XLA:CPU, called from JAX as an FFI custom call (dit_jax/nn/cpu_attention.py builds and loads
// this file with the host's C++ compiler).
//
//   out[b, t, h, :] = softmax_s(scale · q[b, t, h, :] · k[b, s, h, :] | key mask) · v[b, s, h, :]
//
// q: (B, T, H, D), k and v: (B, S, H, D), key_mask: (B, S) (true = attend), out: (B, T, H, D), all fp32; also the
// softmax row max and normaliser (B, H, T) that the backward pass (blockwise_attention's) recomputes P from.
//
// One work item is one (batch, head) pair and a run of query blocks. The item packs that pair's keys transposed,
// K^T (D × S), and its values V (S × Dv) in rows of Dv = D rounded up to whole vectors (every row starts on a cache
// line: split loads cost Intel cores ~15%), then for each block of BQ query rows walks the keys in blocks of BK with
// the online softmax (fp32 running max m, normaliser l, accumulator O in the block's scratch):
//   S = Q K^T  →  masked entries set to finfo(float32).min, padding to −inf
//   m' = max(m, rowmax S);  P = 2^((S − m')·scale·log2 e);  α = 2^((m − m')·scale·log2 e)
//   l = l·α + rowsum P;  O = O·α + P V
// and writes O / l. A row whose keys are all masked averages all keys (every logit equals finfo.min), as the
// materialised reference does; padding never takes part.
//
// The two products run on register tiles written with GCC vector extensions (16 floats per vector: one AVX-512
// register, two AVX2 ones): S on 6 rows × 64 key columns, P V on R rows × the whole head_dim (whole vectors plus a
// half vector for 72's or 88's last 8 lanes; about 24 accumulators). Items are spread over XLA's intra-op thread
// pool; the calling thread works too and waits only for items already taken, so the call completes even if the pool
// runs none of them.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vh __attribute__((vector_size(32)));  // 8 floats: the head_dim remainder of 72, 88, …
constexpr int kLanes = 16;

constexpr int BQ = 120;     // query rows per block (a multiple of every row tile below: 6, 5, 8, 12)
constexpr int BK = 512;     // keys per block (a multiple of the S tile's 64 columns)
constexpr int kSRows = 6;   // S tile: 6 query rows × kSCols vectors of keys
constexpr int kSCols = 4;
constexpr int kTile = kSCols * 16;  // keys per S tile; also the P·V key sub-block
constexpr int kMaxVecs = 8; // head_dim ≤ 128
constexpr float kMasked = -std::numeric_limits<float>::max();  // finfo(float32).min, the reference's masked logit

inline vf load(const float* p) {
  vf r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline vf splat(float x) { return x - vf{}; }  // x − (+0) is x for every x, so this folds to a broadcast
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}
inline float hsum(vf x) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

// 2^x for x ≤ 0 (softmax arguments in base 2: (S − m)·scale·log2 e), within a few ulps; 0 below −125
// (so no result is subnormal; such terms are below 1e-37 of the row's largest, which is 1) and for −inf.
inline vf vexp2(vf x) {
  const vf lo = splat(-125.0f);
  const vf xc = vmax(x, lo);
#ifdef __AVX512F__
  const vf n = (vf)_mm512_roundscale_ps((__m512)xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vf shifter = splat(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
  const vf n = (xc + shifter) - shifter;
#endif
  const vf r = xc - n;  // exact, in [−1/2, 1/2]
  // 2^r = Σ (r ln2)^k / k!, to k = 7: truncation below 6e-9 relative
  vf p = splat(1.525273380405984e-05f);
  p = p * r + splat(1.5403530393381606e-04f);
  p = p * r + splat(1.3333558146428441e-03f);
  p = p * r + splat(9.618129107628477e-03f);
  p = p * r + splat(5.550410866482158e-02f);
  p = p * r + splat(2.402265069591007e-01f);
  p = p * r + splat(6.931471805599453e-01f);
  p = p * r + splat(1.f);
#ifdef __AVX512F__
  const vf y = (vf)_mm512_scalef_ps((__m512)p, (__m512)n);  // p · 2^n in one instruction
#else
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n
  const vf y = p * (vf)bits;  // same-size vector cast: the bits reinterpreted
#endif
  return x < lo ? vf{} : y;
}

// s[r][c] = Σ_d q[r][d] · kt[d][c] for kSRows rows and kSCols·16 columns; mx[r] (one vector per row) takes the
// lane-wise max of row r's new columns, so the softmax need not read S once more for its row max.
inline void s_tile(const float* q, int64_t d_len, const float* kt, int64_t kt_stride, float* s, float* mx) {
  vf acc[kSRows][kSCols] = {};
  for (int64_t d = 0; d < d_len; ++d) {
    vf kv[kSCols];
    for (int c = 0; c < kSCols; ++c) kv[c] = load(kt + d * kt_stride + c * kLanes);
    for (int r = 0; r < kSRows; ++r) {
      vf qb = splat(q[r * d_len + d]);
      for (int c = 0; c < kSCols; ++c) acc[r][c] += qb * kv[c];
    }
  }
  for (int r = 0; r < kSRows; ++r) {
    vf m = load(mx + r * kLanes);
    for (int c = 0; c < kSCols; ++c) {
      store(s + r * BK + c * kLanes, acc[r][c]);
      m = vmax(m, acc[r][c]);
    }
    store(mx + r * kLanes, m);
  }
}

// o[r][0:w] += Σ_j p[r][j] · v[j][0:w] for R rows, j < cols, with w = 16·G (+ 8 if HALF: the last 8 lanes of a
// head_dim that leaves 1–8 after its whole vectors, 72 = 4·16 + 8, 88 = 5·16 + 8, taken as a half vector instead of
// padding the row); rows of v and o are `stride` floats apart (a whole number of vectors).
template <int R, int G, bool HALF>
inline void pv_tile(const float* p, const float* v, int64_t stride, int64_t cols, float* o) {
  vf acc[R][G > 0 ? G : 1];
  vh tail[R];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < G; ++c) acc[r][c] = load(o + r * stride + c * kLanes);
    if constexpr (HALF) std::memcpy(&tail[r], o + r * stride + G * kLanes, sizeof(vh));
  }
  for (int64_t j = 0; j < cols; ++j) {
    vf vv[G > 0 ? G : 1];
    vh vt;
    for (int c = 0; c < G; ++c) vv[c] = load(v + j * stride + c * kLanes);
    if constexpr (HALF) std::memcpy(&vt, v + j * stride + G * kLanes, sizeof vt);
    for (int r = 0; r < R; ++r) {
      const float pr = p[r * BK + j];
      const vf pb = splat(pr);
      for (int c = 0; c < G; ++c) acc[r][c] += pb * vv[c];
      if constexpr (HALF) tail[r] += __builtin_shufflevector(pb, pb, 0, 1, 2, 3, 4, 5, 6, 7) * vt;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < G; ++c) store(o + r * stride + c * kLanes, acc[r][c]);
    if constexpr (HALF) std::memcpy(o + r * stride + G * kLanes, &tail[r], sizeof(vh));
  }
}

// Rows per P·V tile for G whole vectors (+ a half one): about 24 accumulators, the measured best on AVX-512
// (6 × 4, 5 × 5, 8 × 3, 12 × 2; with a half vector 6 × 4½, 4 × 5½, 6 × 3½, 8 × 2½, 12 × 1½).
template <int G, bool HALF>
constexpr int pv_rows() {
  if constexpr (HALF) return G >= 5 ? 4 : (G >= 3 ? 6 : (G == 2 ? 8 : 12));
  return G == 5 ? 5 : (G == 4 ? 6 : (G == 3 ? 8 : 12));
}

template <int G, bool HALF>
void pv_group(const float* p, const float* v, int64_t stride, int64_t cols, float* o, int64_t rows) {
  constexpr int R = pv_rows<G, HALF>();
  static_assert(BQ % R == 0, "BQ must be a multiple of the P·V row tile");
  for (int r = 0; r < rows; r += R)  // the tiles that hold the block's live rows (BQ is a multiple of R)
    pv_tile<R, G, HALF>(p + r * BK, v, stride, cols, o + r * stride);
}

// O (BQ × w) += P (BQ × cols) · V (cols × w) with w = 16·F (+ 8 if HALF; rows stay whole vectors apart): up to 5
// whole vectors (and the half one) in a single pass over P and V; wider rows in two groups (8 = 4 + 4, 7 = 4 + 3,
// 6 = 3 + 3, each + the half).
template <int F, bool HALF>
void pv_block(const float* p, const float* v, int64_t cols, float* o, int64_t rows) {
  constexpr int stride = (F + (HALF ? 1 : 0)) * kLanes;
  constexpr int first = F <= 5 ? 0 : (F == 6 ? 3 : 4);
  if constexpr (first > 0) pv_group<first, false>(p, v, stride, cols, o, rows);
  pv_group<F - first, HALF>(p, v + first * kLanes, stride, cols, o + first * kLanes, rows);
}

using PvFn = void (*)(const float*, const float*, int64_t, float*, int64_t);

// Columns of V that P·V computes for head_dim d: whole vectors, plus a half vector when the rest fits in one.
int64_t packed_width(int64_t d) {
  const int64_t rest = d % kLanes;
  return d / kLanes * kLanes + (rest == 0 ? 0 : (rest <= kLanes / 2 ? kLanes / 2 : kLanes));
}

PvFn pv_for(int64_t d) {
  static const PvFn whole[kMaxVecs + 1] = {nullptr, pv_block<1, false>, pv_block<2, false>, pv_block<3, false>,
                                           pv_block<4, false>, pv_block<5, false>, pv_block<6, false>,
                                           pv_block<7, false>, pv_block<8, false>};
  static const PvFn half[kMaxVecs] = {pv_block<0, true>, pv_block<1, true>, pv_block<2, true>, pv_block<3, true>,
                                      pv_block<4, true>, pv_block<5, true>, pv_block<6, true>, pv_block<7, true>};
  const int64_t dv = packed_width(d);
  return dv % kLanes ? half[dv / kLanes] : whole[dv / kLanes];
}

struct Problem {
  const float *q, *k, *v;
  const bool* mask;  // (B, S) or nullptr
  float* out;
  float *row_max, *row_sum;  // (B, H, T): the softmax statistics in natural-log units, for the backward pass
  int64_t B, T, S, H, D;
  float scale;
};

// Cache-line aligned storage: with rows a whole number of vectors apart, no vector load straddles two lines.
template <class T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <class U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned&) const { return true; }
  bool operator!=(const Aligned&) const { return false; }
};

// Scratch reused by one thread across its items.
struct Scratch {
  std::vector<float, Aligned<float>> kt, vp, keep, qs, s, mx, o, m, l;
};

void run_item(const Problem& pb, int64_t b, int64_t h, int64_t q_begin, int64_t q_end, Scratch& w) {
  const int64_t D = pb.D, S = pb.S, H = pb.H;
  const int64_t dv = (D + kLanes - 1) / kLanes * kLanes;
  const int64_t sp = (S + BK - 1) / BK * BK;
  const int64_t row = H * D;  // stride between tokens
  // K^T in column tiles, [sp / kTile][D][kTile] (each tile contiguous), and V in rows of dv; the scratch is reused,
  // so only what is read past the keys is cleared: the last tile's columns and rows after S, V's lanes after D
  const int64_t s_tiles = (S + kTile - 1) / kTile * kTile;
  w.kt.resize(D * sp);
  w.vp.resize(sp * dv);
  for (int64_t s = S; s < s_tiles; ++s) {
    for (int64_t d = 0; d < D; ++d) w.kt[(s / kTile) * D * kTile + d * kTile + s % kTile] = 0.f;
    std::fill(&w.vp[s * dv], &w.vp[s * dv] + dv, 0.f);
  }
  w.keep.resize(sp);  // per key: its logit as computed (1), finfo.min (masked) or −inf (padding)
  for (int64_t s = 0; s < S; ++s) {
    const float* ks = pb.k + (b * S + s) * row + h * D;
    const float* vs = pb.v + (b * S + s) * row + h * D;
    float* kt = &w.kt[(s / kTile) * D * kTile + s % kTile];
    for (int64_t d = 0; d < D; ++d) kt[d * kTile] = ks[d];
    std::memcpy(&w.vp[s * dv], vs, D * sizeof(float));
    std::fill(&w.vp[s * dv + D], &w.vp[s * dv + dv], 0.f);
    w.keep[s] = (pb.mask == nullptr || pb.mask[b * S + s]) ? 1.f : kMasked;
  }
  for (int64_t s = S; s < sp; ++s) w.keep[s] = -std::numeric_limits<float>::infinity();
  const bool any_masked =
      pb.mask != nullptr && std::any_of(pb.mask + b * S, pb.mask + (b + 1) * S, [](bool x) { return !x; });

  w.qs.resize(BQ * D);
  w.s.resize(BQ * BK);
  w.mx.resize(BQ * kLanes);
  w.o.resize(BQ * dv);
  w.m.resize(BQ);
  w.l.resize(BQ);
  const PvFn pv = pv_for(D);
  // logits stay unscaled until the exponent: 2^((x − m)·scale·log2(e)); x − m is exact for the terms near the max
  // (Sterbenz), is 0 where a row's keys are all masked (x = m = finfo.min) and −inf on padding
  const float base2 = static_cast<float>(static_cast<double>(pb.scale) * 1.4426950408889634);
  const vf base2v = splat(base2);
  for (int64_t t0 = q_begin; t0 < q_end; t0 += BQ) {
    const int64_t rows = std::min<int64_t>(BQ, pb.T - t0);
    for (int64_t r = 0; r < BQ; ++r) {
      float* dst = &w.qs[r * D];
      if (r < rows) {
        const float* src = pb.q + (b * pb.T + t0 + r) * row + h * D;
        std::memcpy(dst, src, D * sizeof(float));
      } else {
        std::fill(dst, dst + D, 0.f);
      }
    }
    std::fill(w.o.begin(), w.o.end(), 0.f);
    std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
    std::fill(w.l.begin(), w.l.end(), 0.f);
    for (int64_t s0 = 0; s0 < sp; s0 += BK) {
      const int64_t live = std::min<int64_t>(BK, S - s0);  // keys in this block (sp is a multiple of BK)
      const int64_t tiles = (live + kTile - 1) / kTile;
      const int64_t width = tiles * kTile;  // columns computed: whole tiles, padding included
      std::fill(w.mx.begin(), w.mx.end(), -std::numeric_limits<float>::infinity());
      for (int64_t c = 0; c < tiles; ++c) {  // one K^T tile stays in L1 while the query rows stream past
        const float* kt = &w.kt[(s0 / kTile + c) * D * kTile];
        for (int r = 0; r < rows; r += kSRows)
          s_tile(&w.qs[r * D], D, kt, kTile, &w.s[r * BK + c * kTile], &w.mx[r * kLanes]);
      }
      const bool edit = any_masked || live < width;  // masked or padding columns: the row max is taken again
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = &w.s[r * BK];
        vf mx = load(&w.mx[r * kLanes]);
        if (edit) {
          mx = splat(-std::numeric_limits<float>::infinity());
          for (int64_t c = 0; c < width; c += kLanes) {
            const vf keep = load(&w.keep[s0 + c]);
            const vf x = keep == splat(1.f) ? load(sr + c) : keep;
            store(sr + c, x);
            mx = vmax(mx, x);
          }
        }
        const float m_new = std::max(w.m[r], hmax(mx));  // of the unscaled logits: scale > 0 keeps the order
        const vf mv = splat(m_new);
        vf sum = {};
        for (int64_t c = 0; c < width; c += kLanes) {
          vf p = vexp2((load(sr + c) - mv) * base2v);
          store(sr + c, p);
          sum += p;
        }
        const float alpha = vexp2(splat((w.m[r] - m_new) * base2))[0];  // 2^−inf = 0 on the first block
        w.l[r] = w.l[r] * alpha + hsum(sum);
        w.m[r] = m_new;
        if (alpha != 1.f) {
          float* orow = &w.o[r * dv];
          for (int64_t d = 0; d < dv; ++d) orow[d] *= alpha;
        }
      }
      for (int64_t r = rows; r < BQ; ++r)  // rows past the end of the queries: P = 0 in the tiles that cover them
        std::fill(&w.s[r * BK], &w.s[r * BK] + width, 0.f);
      for (int64_t j = 0; j < width; j += kTile)  // kTile value rows stay in L1 while the rows of P stream past
        pv(w.s.data() + j, &w.vp[(s0 + j) * dv], std::min<int64_t>(kTile, width - j), w.o.data(), rows);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = pb.out + (b * pb.T + t0 + r) * row + h * D;
      const float inv = 1.f / w.l[r];
      for (int64_t d = 0; d < D; ++d) dst[d] = w.o[r * dv + d] * inv;
      // m is in base 2; a row whose keys are all masked keeps the marker finfo.min (its P is uniform)
      const int64_t stat = (b * H + h) * pb.T + t0 + r;
      pb.row_max[stat] = w.m[r] == kMasked ? kMasked : w.m[r] * pb.scale;
      pb.row_sum[stat] = w.l[r];
    }
  }
}

// Runs fn(i) for i in [0, n) on the pool and the calling thread; returns when all are done.
void parallel_for(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t, Scratch&)> fn) {
  struct State {
    std::function<void(int64_t, Scratch&)> fn;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  st->fn = std::move(fn);
  st->n = n;
  auto work = [](State& s) {
    static thread_local Scratch scratch;  // kept by each thread across calls: no allocation per call
    for (int64_t i; (i = s.next.fetch_add(1)) < s.n;) {
      s.fn(i, scratch);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([st, work] { work(*st); });
  work(*st);
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

ffi::Error attention_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> key_mask, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> row_max, ffi::ResultBuffer<ffi::F32> row_sum,
                          float scale, bool has_mask) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = key_mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("dit_jax_cpu_attention: q, k, v must be (B, T, H, D)");
  const int64_t B = qd[0], T = qd[1], H = qd[2], D = qd[3], S = kd[1];
  if (kd[0] != B || kd[2] != H || kd[3] != D || vd[0] != B || vd[1] != S || vd[2] != H || vd[3] != D)
    return ffi::Error::InvalidArgument("dit_jax_cpu_attention: k and v must be (B, S, H, D) like q");
  if (D < 1 || D > kMaxVecs * kLanes)
    return ffi::Error::InvalidArgument("dit_jax_cpu_attention: head_dim must be 1..128");
  if (md.size() != 2 || md[0] != B || md[1] != S)
    return ffi::Error::InvalidArgument("dit_jax_cpu_attention: key_mask must be (B, S)");
  if (B * T * H == 0) return ffi::Error::Success();
  if (S == 0) return ffi::Error::InvalidArgument("dit_jax_cpu_attention: no keys");

  Problem pb{q.typed_data(), k.typed_data(), v.typed_data(), has_mask ? key_mask.typed_data() : nullptr,
             out->typed_data(), row_max->typed_data(), row_sum->typed_data(), B, T, S, H, D, scale};
  // Split each (batch, head) pair's query blocks into enough runs to keep every thread busy.
  const int64_t blocks = (T + BQ - 1) / BQ;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t runs = std::clamp<int64_t>((4 * threads + B * H - 1) / (B * H), 1, blocks);
  const int64_t per_run = (blocks + runs - 1) / runs;
  parallel_for(pool, B * H * runs, [&pb, runs, per_run](int64_t i, Scratch& w) {
    const int64_t pair = i / runs, run = i % runs;
    const int64_t begin = run * per_run * BQ;
    const int64_t end = std::min<int64_t>(pb.T, (run + 1) * per_run * BQ);
    if (begin < end) run_item(pb, pair / pb.H, pair % pb.H, begin, end, w);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DitJaxCpuAttention, attention_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("has_mask"));
