// Dense-layer matrix product for XLA:CPU, called from JAX as an FFI custom call (dit_jax/nn/cpu_dense.py builds and
// loads this file with the host's C++ compiler, then hands it the address of a single-threaded BLAS sgemm).
//
//   c = op(a) · op(b),   op(x) = x or xᵀ (the trans_a / trans_b attributes); all fp32, row-major.
//
// a: (M, K), or (K, M) with trans_a; b: (K, N), or (N, K) with trans_b; c: (M, N). The output is cut into as many
// slabs as XLA's intra-op pool has threads (rows of c when M ≥ N, else columns, at least kMinSlab wide), and each slab
// is one cblas_sgemm on a pool thread (the calling thread works too and waits only for slabs already taken, so the
// call completes even if the pool runs none of them). The BLAS itself runs single-threaded: the product is parallel
// on XLA's threads, which would otherwise spin against the BLAS's own.
//
// cblas_sgemm's integers are 64-bit in an ILP64 build (symbol suffix "64_", as numpy's OpenBLAS) and 32-bit
// otherwise; DitJaxSetSgemm says which.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // the CBLAS enum values
constexpr int64_t kMinSlab = 32;                               // rows or columns of c per slab, at least
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                         int64_t, float, float*, int64_t);
using Sgemm32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                         int32_t, float, float*, int32_t);

void* g_sgemm = nullptr;
bool g_ilp64 = true;

// c (m × n, row stride ldc) = op(a) · op(b) with the stored matrices' row strides lda, ldb.
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float* c, int64_t ldc) {
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  if (g_ilp64) {
    reinterpret_cast<Sgemm64>(g_sgemm)(kRowMajor, ta, tb, m, n, k, 1.f, a, lda, b, ldb, 0.f, c, ldc);
  } else {
    reinterpret_cast<Sgemm32>(g_sgemm)(kRowMajor, ta, tb, int32_t(m), int32_t(n), int32_t(k), 1.f, a, int32_t(lda),
                                       b, int32_t(ldb), 0.f, c, int32_t(ldc));
  }
}

ffi::Error dense_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("dit_jax_cpu_dense: no BLAS sgemm was set");
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("dit_jax_cpu_dense: a, b and c must be matrices");
  const int64_t M = trans_a ? da[1] : da[0], K = trans_a ? da[0] : da[1];
  const int64_t N = trans_b ? db[0] : db[1], Kb = trans_b ? db[1] : db[0];
  if (K != Kb || dc[0] != M || dc[1] != N)
    return ffi::Error::InvalidArgument("dit_jax_cpu_dense: shapes do not agree (a, b, c)");
  if (!g_ilp64 && std::max({M, N, K}) > INT32_MAX)
    return ffi::Error::InvalidArgument("dit_jax_cpu_dense: a dimension exceeds this BLAS's 32-bit integers");
  if (M == 0 || N == 0) return ffi::Error::Success();
  float* out = c->typed_data();
  if (K == 0) {
    std::memset(out, 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }
  const float *A = a.typed_data(), *B = b.typed_data();
  const int64_t lda = da[1], ldb = db[1];
  const bool by_rows = M >= N;
  const int64_t extent = by_rows ? M : N;
  const int64_t slabs = std::clamp<int64_t>(std::min<int64_t>(pool.num_threads(), extent / kMinSlab), 1, extent);
  const int64_t width = (extent + slabs - 1) / slabs;

  auto slab = [=](int64_t s) {
    const int64_t lo = s * width, hi = std::min(extent, lo + width);
    if (hi <= lo) return;
    if (by_rows) {  // rows lo..hi of c: rows of a (columns when a is stored transposed)
      sgemm(trans_a, trans_b, hi - lo, N, K, trans_a ? A + lo : A + lo * lda, lda, B, ldb, out + lo * N, N);
    } else {  // columns lo..hi of c: columns of b (rows when b is stored transposed)
      sgemm(trans_a, trans_b, M, hi - lo, K, A, lda, trans_b ? B + lo * ldb : B + lo, ldb, out + lo, N);
    }
  };
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, slab, slabs] {
    for (int64_t s; (s = st->next.fetch_add(1)) < slabs;) {
      slab(s);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < slabs; ++i) pool.Schedule([work] { work(); });
  work();
  while (st->done.load(std::memory_order_acquire) < slabs) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

extern "C" void DitJaxSetSgemm(void* sgemm, int ilp64) {
  g_sgemm = sgemm;
  g_ilp64 = ilp64 != 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DitJaxCpuDense, dense_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
