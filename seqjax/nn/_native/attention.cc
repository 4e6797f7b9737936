// seqjax's CPU kernel for multi-head self-attention from the fused q/k/v projection, forward and backward, as XLA
// FFI custom calls (BENCHMARKS.md has why and what it gains).
//
// Layouts (row-major): qkv [B, T, 3, N, H] as MultiHeadAttention projects it (q already scaled by 1/sqrt(H)); mask
// bool [Bm, Nm, Tm, T] with each of Bm, Nm, Tm either 1 (broadcast) or full; out and dout [B, T, N, H]; lse
// [B, N, T] (log-sum-exp of each query's scores, +inf for a fully masked query); dqkv like qkv.
// Per head: S = Q K^T, P = softmax(S) over the allowed keys (a fully masked query gets P = 0, so a zero output and
// zero gradients), O = P V; the backward recomputes P from S and lse: dV = P^T dO, dS = P * (dO V^T - rowsum(dO*O)),
// dQ = dS K, dK = dS^T Q. Each head's operands are read straight out of qkv (row stride 3NH) and its gradients
// written straight into dqkv, so no transposed copies are made.
//
// Threads: heads are split between as many threads as the process may use cores (at most one per head), each
// running the BLAS single-threaded (openblas_set_num_threads_local), when that function was given; otherwise the
// heads run one after the other with the BLAS's own threads (common.h).
// -ffast-math (for vectorised expf) assumes no infinities, so masked scores are skipped by test, never set to -inf.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using seqjax::gemm;

float positive_infinity() {
  const uint32_t bits = 0x7f800000u;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Shape {
  int64_t B, T, N, H;
  int64_t ld() const { return 3 * N * H; }  // row stride of q, k, v, dq, dk, dv inside qkv
};

// The mask's row for (b, n, query i), or nullptr where everything may be attended.
struct Mask {
  const bool* data = nullptr;
  int64_t sb = 0, sn = 0, sq = 0;
  const bool* row(int64_t b, int64_t n, int64_t i) const {
    return data == nullptr ? nullptr : data + b * sb + n * sn + i * sq;
  }
};

ffi::Error make_mask(ffi::Buffer<ffi::PRED>& mask, const Shape& s, Mask* out) {
  auto d = mask.dimensions();
  if (d.size() != 4 || d[3] != s.T || (d[0] != 1 && d[0] != s.B) || (d[1] != 1 && d[1] != s.N) ||
      (d[2] != 1 && d[2] != s.T))
    return ffi::Error::InvalidArgument("seqjax attention kernel: mask must be [B|1, N|1, T|1, T]");
  const bool* p = mask.typed_data();
  const int64_t count = d[0] * d[1] * d[2] * d[3];
  if (std::all_of(p, p + count, [](bool v) { return v; })) return ffi::Error::Success();  // nothing masked
  out->data = p;
  out->sq = d[2] == 1 ? 0 : s.T;
  out->sn = d[1] == 1 ? 0 : d[2] * s.T;
  out->sb = d[0] == 1 ? 0 : d[1] * d[2] * s.T;
  return ffi::Error::Success();
}

ffi::Error make_shape(ffi::Buffer<ffi::F32>& qkv, Shape* s) {
  if (seqjax::sgemm == nullptr) return ffi::Error::Internal("seqjax attention kernel: no sgemm was set");
  auto d = qkv.dimensions();
  if (d.size() != 5 || d[2] != 3) return ffi::Error::InvalidArgument("seqjax attention kernel: qkv must be [B, T, 3, N, H]");
  *s = Shape{d[0], d[1], d[3], d[4]};
  if (s->T * s->T > INT32_MAX || s->T * s->ld() > INT32_MAX)
    return ffi::Error::InvalidArgument("seqjax attention kernel: arrays too large for 32-bit BLAS indices");
  return ffi::Error::Success();
}

// Per-thread working memory for one head: two [T, T] score tiles and a [T, H] product, uninitialised.
struct Scratch {
  std::unique_ptr<float[]> a, b, c;
  Scratch(int64_t t, int64_t h) : a(new float[t * t]), b(new float[t * t]), c(new float[t * std::max(h, int64_t{1})]) {}
};

// Runs fn(head, scratch) for head in [0, heads), the heads split between seqjax::run_workers' threads.
template <typename Fn>
void for_each_head(int64_t heads, int64_t t, int64_t h, Fn fn) {
  seqjax::run_workers(seqjax::worker_count(heads), [&](int64_t w, int64_t workers) {
    Scratch scratch(t, h);
    for (int64_t i = heads * w / workers; i < heads * (w + 1) / workers; ++i) fn(i, scratch);
  });
}

}  // namespace

static ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                              ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  if (auto e = make_shape(qkv, &s); e.failure()) return e;
  Mask m;
  if (auto e = make_mask(mask, s, &m); e.failure()) return e;
  const int64_t T = s.T, N = s.N, H = s.H, ld = s.ld();
  const float* base = qkv.typed_data();
  float *po = out->typed_data(), *pl = lse->typed_data();
  const float inf = positive_infinity();

  for_each_head(s.B * N, T, H, [&](int64_t head, Scratch& w) {
    const int64_t b = head / N, n = head % N;
    float *p = w.a.get(), *o = w.c.get(), *inv = w.b.get();
    const float* q = base + b * T * ld + n * H;
    gemm(false, true, T, T, H, q, ld, q + N * H, ld, p, T);  // S = Q K^T
    for (int64_t i = 0; i < T; ++i) {
      float* row = p + i * T;
      const bool* allowed = m.row(b, n, i);
      float mx = 0.0f, l = 0.0f;
      bool any = allowed == nullptr;
      if (allowed == nullptr) {
        mx = *std::max_element(row, row + T);
        for (int64_t j = 0; j < T; ++j) row[j] = std::exp(row[j] - mx);
      } else {
        for (int64_t j = 0; j < T; ++j)
          if (allowed[j]) {
            mx = any ? std::max(mx, row[j]) : row[j];
            any = true;
          }
        for (int64_t j = 0; j < T; ++j) row[j] = allowed[j] ? std::exp(row[j] - mx) : 0.0f;
      }
      for (int64_t j = 0; j < T; ++j) l += row[j];
      inv[i] = any ? 1.0f / l : 0.0f;
      pl[head * T + i] = any ? mx + std::log(l) : inf;
    }
    gemm(false, false, T, H, T, p, T, q + 2 * N * H, ld, o, H);  // O = E V
    for (int64_t i = 0; i < T; ++i) {
      float* dst = po + ((b * T + i) * N + n) * H;
      for (int64_t k = 0; k < H; ++k) dst[k] = o[i * H + k] * inv[i];
    }
  });
  return ffi::Error::Success();
}

static ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out,
                               ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dqkv) {
  Shape s;
  if (auto e = make_shape(qkv, &s); e.failure()) return e;
  Mask m;
  if (auto e = make_mask(mask, s, &m); e.failure()) return e;
  const int64_t T = s.T, N = s.N, H = s.H, ld = s.ld(), ldo = N * H;
  const float *base = qkv.typed_data(), *po = out.typed_data(), *pl = lse.typed_data(), *pdo = dout.typed_data();
  float* dbase = dqkv->typed_data();

  for_each_head(s.B * N, T, H, [&](int64_t head, Scratch& w) {
    const int64_t b = head / N, n = head % N;
    float *p = w.a.get(), *dp = w.b.get(), *delta = w.c.get();
    const float *q = base + b * T * ld + n * H, *k = q + N * H, *v = q + 2 * N * H;
    const float *o = po + b * T * ldo + n * H, *d_o = pdo + b * T * ldo + n * H;
    float* dq = dbase + b * T * ld + n * H;
    gemm(false, true, T, T, H, q, ld, k, ld, p, T);  // S = Q K^T
    for (int64_t i = 0; i < T; ++i) {
      float* row = p + i * T;
      const bool* allowed = m.row(b, n, i);
      const float li = pl[head * T + i];
      if (allowed == nullptr) {
        for (int64_t j = 0; j < T; ++j) row[j] = std::exp(row[j] - li);
      } else {
        for (int64_t j = 0; j < T; ++j) row[j] = allowed[j] ? std::exp(row[j] - li) : 0.0f;
      }
      float acc = 0.0f;
      for (int64_t c = 0; c < H; ++c) acc += d_o[i * ldo + c] * o[i * ldo + c];
      delta[i] = acc;
    }
    gemm(false, true, T, T, H, d_o, ldo, v, ld, dp, T);            // dP = dO V^T
    gemm(true, false, T, H, T, p, T, d_o, ldo, dq + 2 * N * H, ld);  // dV = P^T dO
    for (int64_t i = 0; i < T; ++i) {
      float *ds = dp + i * T;
      const float* pr = p + i * T;
      for (int64_t j = 0; j < T; ++j) ds[j] = pr[j] * (ds[j] - delta[i]);  // dS
    }
    gemm(false, false, T, H, T, dp, T, k, ld, dq, ld);         // dQ = dS K
    gemm(true, false, T, H, T, dp, T, q, ld, dq + N * H, ld);  // dK = dS^T Q
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dqkv
);
