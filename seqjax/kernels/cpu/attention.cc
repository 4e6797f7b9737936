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
#include <exception>
#include <memory>
#include <string>
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
  if (d.size() != 5 || d[2] != 3)
    return ffi::Error::InvalidArgument("seqjax attention kernel: qkv must be [B, T, 3, N, H]");
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

// Queries are taken QUERY_BLOCK at a time when a mask is given, each block against only the keys that some of its
// queries may attend (read off the mask): a causal mask then costs about half the products, a padding mask skips
// the padded keys. Without a mask a head is one block.
constexpr int64_t QUERY_BLOCK = 64;

// The queries [i0, i0 + rows) of head (b, n), and the keys [lo, lo + nk) that any of them may attend (nk = 0: none).
struct Block {
  int64_t head, b, n, i0, rows, lo = 0, nk = 0;
};

void set_key_range(const Mask& m, int64_t t, Block* blk) {
  int64_t lo = t, hi = 0;
  for (int64_t i = blk->i0; i < blk->i0 + blk->rows; ++i) {
    const bool* row = m.row(blk->b, blk->n, i);
    if (row == nullptr) {
      lo = 0;
      hi = t;
      break;
    }
    int64_t first = 0, last = t;
    while (first < t && !row[first]) ++first;
    while (last > first && !row[last - 1]) --last;
    if (first < last) {
      lo = std::min(lo, first);
      hi = std::max(hi, last);
    }
  }
  blk->lo = lo;
  blk->nk = std::max<int64_t>(hi - lo, 0);
}

// Runs fn(block, scratch) over every head's query blocks, in order within a head; the heads are split between
// seqjax::run_workers' threads.
template <typename Fn>
void for_each_block(const Shape& s, const Mask& m, Fn fn) {
  const int64_t heads = s.B * s.N, qb = m.data == nullptr ? s.T : QUERY_BLOCK;
  seqjax::run_workers(seqjax::worker_count(heads), [&](int64_t w, int64_t workers) {
    Scratch scratch(s.T, s.H);
    for (int64_t head = heads * w / workers; head < heads * (w + 1) / workers; ++head) {
      for (int64_t i0 = 0; i0 < s.T; i0 += qb) {
        Block blk{head, head / s.N, head % s.N, i0, std::min(qb, s.T - i0)};
        set_key_range(m, s.T, &blk);
        fn(blk, scratch);
      }
    }
  });
}

// row[j] = exp(row[j] - shift) where allowed (allowed == nullptr: everywhere), 0 elsewhere.
void exp_shifted(float* row, const bool* allowed, int64_t n, float shift) {
  if (allowed == nullptr) {
    for (int64_t j = 0; j < n; ++j) row[j] = std::exp(row[j] - shift);
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] = allowed[j] ? std::exp(row[j] - shift) : 0.0f;
  }
}

// Reads the shapes and the mask of a call; both passes start here.
ffi::Error prepare(ffi::Buffer<ffi::F32>& qkv, ffi::Buffer<ffi::PRED>& mask, Shape* s, Mask* m) {
  if (auto e = make_shape(qkv, s); e.failure()) return e;
  return make_mask(mask, *s, m);
}

}  // namespace

static ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                              ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  Mask m;
  if (auto e = prepare(qkv, mask, &s, &m); e.failure()) return e;
  const int64_t T = s.T, N = s.N, H = s.H, ld = s.ld();
  const float* base = qkv.typed_data();
  float *po = out->typed_data(), *pl = lse->typed_data();
  const float inf = positive_infinity();

  return seqjax::guarded("seqjax attention kernel", [&] {
    for_each_block(s, m, [&](const Block& blk, Scratch& w) {
      const int64_t rows = blk.rows, lo = blk.lo, nk = blk.nk;
      const float *q = base + blk.b * T * ld + blk.n * H + blk.i0 * ld, *k = base + blk.b * T * ld + (N + blk.n) * H,
                  *v = k + N * H;
      float *p = w.a.get(), *o = w.c.get(), *inv = w.b.get(), *lse_b = pl + blk.head * T + blk.i0;
      if (nk == 0) {  // no query of the block may attend anything: zero outputs
        for (int64_t r = 0; r < rows; ++r) {
          std::memset(po + ((blk.b * T + blk.i0 + r) * N + blk.n) * H, 0, H * sizeof(float));
          lse_b[r] = inf;
        }
        return;
      }
      gemm(false, true, rows, nk, H, q, ld, k + lo * ld, ld, p, nk);  // S = Q K^T on the key range
      for (int64_t r = 0; r < rows; ++r) {
        float* row = p + r * nk;
        const bool* allowed = m.row(blk.b, blk.n, blk.i0 + r);
        float mx = 0.0f;
        bool any = allowed == nullptr;
        if (allowed == nullptr) {
          mx = *std::max_element(row, row + nk);
        } else {
          allowed += lo;
          for (int64_t j = 0; j < nk; ++j)
            if (allowed[j]) {
              mx = any ? std::max(mx, row[j]) : row[j];
              any = true;
            }
        }
        exp_shifted(row, allowed, nk, mx);
        float l = 0.0f;
        for (int64_t j = 0; j < nk; ++j) l += row[j];
        inv[r] = any ? 1.0f / l : 0.0f;
        lse_b[r] = any ? mx + std::log(l) : inf;
      }
      gemm(false, false, rows, H, nk, p, nk, v + lo * ld, ld, o, H);  // O = E V
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = po + ((blk.b * T + blk.i0 + r) * N + blk.n) * H;
        for (int64_t c = 0; c < H; ++c) dst[c] = o[r * H + c] * inv[r];
      }
    });
  });
}

static ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out,
                               ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dqkv) {
  Shape s;
  Mask m;
  if (auto e = prepare(qkv, mask, &s, &m); e.failure()) return e;
  const int64_t T = s.T, N = s.N, H = s.H, ld = s.ld(), ldo = N * H;
  const float *base = qkv.typed_data(), *po = out.typed_data(), *pl = lse.typed_data(), *pdo = dout.typed_data();
  float* dbase = dqkv->typed_data();
  // With a mask, dK and dV accumulate over the query blocks, and keys outside every block's range get none.
  const bool masked = m.data != nullptr;
  const float beta = masked ? 1.0f : 0.0f;

  return seqjax::guarded("seqjax attention kernel", [&] {
    for_each_block(s, m, [&](const Block& blk, Scratch& w) {
      const int64_t rows = blk.rows, lo = blk.lo, nk = blk.nk, head0 = blk.b * T * ld + blk.n * H;
      const float *q = base + head0, *k = q + N * H, *v = q + 2 * N * H;
      const int64_t rows0 = (blk.b * T + blk.i0) * ldo + blk.n * H;  // the block's first row in out and dout
      const float *o = po + rows0, *d_o = pdo + rows0;
      float *dq = dbase + head0, *dk = dq + N * H, *dv = dq + 2 * N * H, *p = w.a.get(), *dp = w.b.get(),
            *delta = w.c.get();
      if (masked && blk.i0 == 0) {
        for (int64_t j = 0; j < T; ++j) {
          std::memset(dk + j * ld, 0, H * sizeof(float));
          std::memset(dv + j * ld, 0, H * sizeof(float));
        }
      }
      if (nk == 0) {  // no query of the block attends anything: no gradient from it, none to its queries
        for (int64_t r = 0; r < rows; ++r) std::memset(dq + (blk.i0 + r) * ld, 0, H * sizeof(float));
        return;
      }
      gemm(false, true, rows, nk, H, q + blk.i0 * ld, ld, k + lo * ld, ld, p, nk);  // S = Q K^T on the key range
      for (int64_t r = 0; r < rows; ++r) {
        const bool* allowed = m.row(blk.b, blk.n, blk.i0 + r);
        exp_shifted(p + r * nk, allowed == nullptr ? nullptr : allowed + lo, nk, pl[blk.head * T + blk.i0 + r]);
        float acc = 0.0f;
        for (int64_t c = 0; c < H; ++c) acc += d_o[r * ldo + c] * o[r * ldo + c];
        delta[r] = acc;
      }
      gemm(false, true, rows, nk, H, d_o, ldo, v + lo * ld, ld, dp, nk);                  // dP = dO V^T
      gemm(true, false, nk, H, rows, p, nk, d_o, ldo, dv + lo * ld, ld, beta);            // dV += P^T dO
      for (int64_t r = 0; r < rows; ++r) {
        float* ds = dp + r * nk;
        const float* pr = p + r * nk;
        for (int64_t j = 0; j < nk; ++j) ds[j] = pr[j] * (ds[j] - delta[r]);  // dS
      }
      gemm(false, false, rows, H, nk, dp, nk, k + lo * ld, ld, dq + blk.i0 * ld, ld);        // dQ = dS K
      gemm(true, false, nk, H, rows, dp, nk, q + blk.i0 * ld, ld, dk + lo * ld, ld, beta);  // dK += dS^T Q
    });
  });
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
