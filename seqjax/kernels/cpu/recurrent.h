// Shared by seqjax's recurrent-layer kernels (lstm.cc, gru.cc): a register-tiled AVX2/FMA micro-kernel over packed
// operands, the packing routines, pooled working memory, and a team of threads with a spin barrier. Why and how:
// docs/ARCHITECTURE.md ("How the LSTM and GRU kernels work").
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace seqjax::rnn {

namespace ffi = xla::ffi;

constexpr int64_t MR = 6;   // rows of the micro-kernel's tile
constexpr int64_t NR = 16;  // columns of the micro-kernel's tile, and the block of hidden units

// ---------------------------------------------------------------------------------------------------------------
// Packed operands. A [M, K] is packed in blocks of MR rows (the last block has M % MR rows if that is not 0): the
// block starting at row m0 with mr rows lies at a + m0 * K, as [K][mr]. B [K, N] is packed as panels of NR columns,
// each [K][NR], zero beyond the matrix.

inline int64_t block_rows(int64_t m0, int64_t M) { return std::min(MR, M - m0); }

// Row b's values for the columns [k0, k0 + n) of the packed A operand a [B, K].
inline void put_packed(float* a, int64_t B, int64_t K, int64_t b, int64_t k0, const float* v, int64_t n) {
  const int64_t m0 = b / MR * MR, mr = block_rows(m0, B);
  float* dst = a + m0 * K + k0 * mr + (b - m0);
  for (int64_t u = 0; u < n; ++u) dst[u * mr] = v[u];
}

// The row blocks [blk0, blk1) of rows [B, K] (row-major) packed as the A operand a.
inline void pack_row_blocks(const float* rows, int64_t B, int64_t K, int64_t blk0, int64_t blk1, float* a) {
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t m0 = blk * MR, mr = block_rows(m0, B);
    float* block = a + m0 * K;
    for (int64_t r = 0; r < mr; ++r)
      for (int64_t k = 0; k < K; ++k) block[k * mr + r] = rows[(m0 + r) * K + k];
  }
}

// Row r of np panels ([np][rows][NR], as products take a B operand) from n values, zeros past them.
inline void put_panel_row(float* panels, int64_t np, int64_t rows, int64_t r, const float* v, int64_t n) {
  for (int64_t q = 0; q < np; ++q) {
    float* dst = panels + (q * rows + r) * NR;
    const int64_t m = std::min(NR, n - NR * q);
    for (int64_t j = 0; j < m; ++j) dst[j] = v[NR * q + j];
    for (int64_t j = m; j < NR; ++j) dst[j] = 0.0f;
  }
}

// tile[r][0:NR] = sum_k a[k][r] p[k][0:NR] for r < mr (a: one packed block of mr rows; p: one panel).
#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kVectorised = true;

// The tile of two products summed, a1 p1 (depth K1) + a2 p2 (depth K2); K2 = 0 for one product.
template <int R>
inline void micro_kernel(const float* __restrict a1, const float* __restrict p1, int64_t K1,
                         const float* __restrict a2, const float* __restrict p2, int64_t K2, float* __restrict tile) {
  const __m256 z = _mm256_setzero_ps();
  __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
#define SEQJAX_ROW(r)                          \
  if constexpr (R > r) {                       \
    x = _mm256_broadcast_ss(a + R * k + r);    \
    c##r##0 = _mm256_fmadd_ps(x, b0, c##r##0); \
    c##r##1 = _mm256_fmadd_ps(x, b1, c##r##1); \
  }
#define SEQJAX_PRODUCT(a_, p_, K_)                                                       \
  {                                                                                      \
    const float* __restrict a = a_;                                                      \
    const float* __restrict p = p_;                                                      \
    for (int64_t k = 0; k < K_; ++k) {                                                   \
      const __m256 b0 = _mm256_load_ps(p + NR * k), b1 = _mm256_load_ps(p + NR * k + 8); \
      __m256 x;                                                                          \
      SEQJAX_ROW(0) SEQJAX_ROW(1) SEQJAX_ROW(2) SEQJAX_ROW(3) SEQJAX_ROW(4) SEQJAX_ROW(5) \
    }                                                                                    \
  }
  SEQJAX_PRODUCT(a1, p1, K1)
  SEQJAX_PRODUCT(a2, p2, K2)
#undef SEQJAX_PRODUCT
#undef SEQJAX_ROW
  const __m256 rows[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(tile + NR * r, rows[2 * r]);
    _mm256_store_ps(tile + NR * r + 8, rows[2 * r + 1]);
  }
}
#else
constexpr bool kVectorised = false;

template <int R>
inline void micro_kernel(const float* __restrict a1, const float* __restrict p1, int64_t K1,
                         const float* __restrict a2, const float* __restrict p2, int64_t K2, float* __restrict tile) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) tile[NR * r + j] = 0.0f;
  for (int64_t k = 0; k < K1; ++k)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NR; ++j) tile[NR * r + j] += a1[R * k + r] * p1[NR * k + j];
  for (int64_t k = 0; k < K2; ++k)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NR; ++j) tile[NR * r + j] += a2[R * k + r] * p2[NR * k + j];
}
#endif

// tile[0:mr][0:NR] = a1 p1 (+ a2 p2): a1, a2 packed blocks of mr rows, K1 and K2 deep; p1, p2 panels.
inline void tile_product(const float* a1, const float* p1, int64_t mr, int64_t K1, float* tile,
                         const float* a2 = nullptr, const float* p2 = nullptr, int64_t K2 = 0) {
  switch (mr) {
    case 6: return micro_kernel<6>(a1, p1, K1, a2, p2, K2, tile);
    case 5: return micro_kernel<5>(a1, p1, K1, a2, p2, K2, tile);
    case 4: return micro_kernel<4>(a1, p1, K1, a2, p2, K2, tile);
    case 3: return micro_kernel<3>(a1, p1, K1, a2, p2, K2, tile);
    case 2: return micro_kernel<2>(a1, p1, K1, a2, p2, K2, tile);
    default: return micro_kernel<1>(a1, p1, K1, a2, p2, K2, tile);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Working memory: one 64-byte aligned arena per call, taken from a pool that keeps a few between calls (a fresh
// allocation of tens of MB is a fresh mmap under glibc, its pages faulted in on first touch on every call).

class Pool {
 public:
  struct Block {
    float* data = nullptr;
    size_t floats = 0;
  };
  Block take(size_t floats) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->floats >= floats && (best == free_.end() || it->floats < best->floats)) best = it;
      if (best != free_.end()) {
        Block b = *best;
        free_.erase(best);
        kept_ -= b.floats;
        return b;
      }
    }
    const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, std::max<size_t>(bytes, 64));
    if (p == nullptr) throw std::bad_alloc();
    return Block{static_cast<float*>(p), floats};
  }
  void give(Block b) {
    std::lock_guard<std::mutex> lock(mu_);
    if (kept_ + b.floats <= kKeepFloats && free_.size() < 4) {
      free_.push_back(b);
      kept_ += b.floats;
    } else {
      std::free(b.data);
    }
  }

 private:
  static constexpr size_t kKeepFloats = size_t{64} << 20;  // at most 256 MiB kept
  std::mutex mu_;
  std::vector<Block> free_;
  size_t kept_ = 0;
};

inline Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: calls may still run while the process exits
  return *p;
}

struct Arena {
  Pool::Block block;
  size_t used = 0, limit;
  explicit Arena(size_t floats) : block(pool().take(floats)), limit(floats) {}
  ~Arena() { pool().give(block); }
  float* take(size_t floats) {  // 64-byte aligned slices, within what size() counted
    float* p = block.data + used;
    used += (floats + 15) / 16 * 16;
    if (used > limit) throw std::logic_error("working memory smaller than its slices");
    return p;
  }
  static size_t size(std::initializer_list<size_t> parts) {
    size_t total = 0;
    for (size_t n : parts) total += (n + 15) / 16 * 16;
    return total;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// A team of threads: fn(w) runs on threads w = 0..n-1 (0 on the caller), all started before any runs, so that a
// thread that cannot be started leaves no one waiting at a barrier. Barrier: spins briefly, then sleeps.

class Barrier {
 public:
  explicit Barrier(int64_t n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int64_t gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      {
        std::lock_guard<std::mutex> lock(mu_);
        generation_.fetch_add(1, std::memory_order_release);
      }
      cv_.notify_all();
      return;
    }
    for (int spins = 0; spins < 2000; ++spins) {  // a step's threads usually arrive within microseconds
      if (generation_.load(std::memory_order_acquire) != gen) return;
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();
#endif
    }
    // Then sleep: with more runnable threads than cores (another kernel call at the same time, XLA's own threads),
    // spinning would take the core from the thread being waited for.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != gen; });
  }

 private:
  const int64_t n_;
  std::atomic<int64_t> arrived_{0}, generation_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

template <typename Fn>
inline void run_team(int64_t n, Fn fn) {
  if (n <= 1) {
    fn(int64_t{0});
    return;
  }
  std::atomic<int> start{0};  // 1: go; -1: a thread could not be started, return
  auto body = [&](int64_t w) {
    int s;
    while ((s = start.load(std::memory_order_acquire)) == 0) std::this_thread::yield();
    if (s > 0) fn(w);
  };
  std::vector<std::thread> threads;
  threads.reserve(n - 1);
  try {
    for (int64_t w = 1; w < n; ++w) threads.emplace_back(body, w);
  } catch (...) {
    start.store(-1, std::memory_order_release);
    for (auto& t : threads) t.join();
    throw;
  }
  start.store(1, std::memory_order_release);
  fn(int64_t{0});
  for (auto& t : threads) t.join();
}

// The hidden units [u0, u1) of thread w: blocks of NR units split as evenly as possible.
struct Part {
  int64_t u0, u1, panels;  // panels: blocks of NR units, the last one padded
  int64_t units() const { return u1 - u0; }
};

inline Part part(int64_t H, int64_t w, int64_t workers) {
  const int64_t blocks = (H + NR - 1) / NR, b0 = blocks * w / workers, b1 = blocks * (w + 1) / workers;
  return Part{std::min(b0 * NR, H), std::min(b1 * NR, H), b1 - b0};  // no blocks: an empty range
}

// Columns [p.u0, p.u1) of a row-major matrix m [K, cols] as panels: panel q holds column u0 + NR q + j at [k][j]
// (zeros past the last column).
inline void pack_columns_as_panels(const float* m, int64_t K, int64_t cols, const Part& p, float* out) {
  for (int64_t q = 0; q < p.panels; ++q) {
    float* panel = out + q * K * NR;
    const int64_t c0 = p.u0 + NR * q, n = std::min(NR, p.u1 - c0);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < n; ++j) panel[k * NR + j] = m[k * cols + c0 + j];
      for (int64_t j = n; j < NR; ++j) panel[k * NR + j] = 0.0f;
    }
  }
}

// Rows [p.u0, p.u1) of a row-major matrix with `cols` columns as panels: panel q holds row u0 + NR q + j at
// [k][j] (zeros past the last row), so that products take the matrix's transpose as their B operand.
inline void pack_rows_as_panels(const float* m, int64_t cols, const Part& p, float* out) {
  for (int64_t q = 0; q < p.panels; ++q) {
    float* panel = out + q * cols * NR;
    const int64_t n = std::min(NR, p.units() - NR * q);
    for (int64_t j = 0; j < NR; ++j) {
      if (j >= n) {
        for (int64_t k = 0; k < cols; ++k) panel[k * NR + j] = 0.0f;
        continue;
      }
      const float* row = m + (p.u0 + NR * q + j) * cols;
      for (int64_t k = 0; k < cols; ++k) panel[k * NR + j] = row[k];
    }
  }
}

// The A operand m^T for the rows [k0, k0 + kk) of m [K, M] (row stride ld), packed in blocks of MR of M: a row of
// A is a column of m.
inline void pack_transposed(const float* m, int64_t M, int64_t k0, int64_t kk, int64_t ld, float* out) {
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int64_t mr = block_rows(m0, M);
    float* block = out + m0 * kk;
    for (int64_t k = 0; k < kk; ++k) {
      const float* src = m + (k0 + k) * ld + m0;
      for (int64_t r = 0; r < mr; ++r) block[k * mr + r] = src[r];
    }
  }
}

// As pack_transposed for h_prev [T * B, H]: row t * B + b is h0[b] at t = 0 and hs[t - 1, b] after.
inline void pack_transposed_shifted(const float* hs, const float* h0, int64_t B, int64_t H, int64_t k0, int64_t kk,
                             float* out) {
  for (int64_t m0 = 0; m0 < H; m0 += MR) {
    const int64_t mr = block_rows(m0, H);
    float* block = out + m0 * kk;
    for (int64_t k = 0; k < kk; ++k) {
      const int64_t row = k0 + k;
      const float* src = (row < B ? h0 + row * H : hs + (row - B) * H) + m0;
      for (int64_t r = 0; r < mr; ++r) block[k * mr + r] = src[r];
    }
  }
}

// c[M, NR] (row stride ldc) += a p: a packed by pack_transposed (M rows, kk deep), p one panel kk deep.
inline void accumulate_product(const float* a, int64_t M, int64_t kk, const float* p, float* c, int64_t ldc,
                               float* tile) {
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int64_t mr = block_rows(m0, M);
    tile_product(a + m0 * kk, p, mr, kk, tile);
    for (int64_t r = 0; r < mr; ++r) {
      float* dst = c + (m0 + r) * ldc;
      for (int64_t j = 0; j < NR; ++j) dst[j] += tile[r * NR + j];
    }
  }
}

constexpr int64_t KC = 256;

// A layer's weight gradients over all steps, for one thread's units pt of `gates` gates: dW_ih = x^T dA_in and
// dW_hh = h_prev^T dA_hidden (h_prev row t * B + b: h0[b] at t = 0, hs[t - 1, b] after), K blocked by kc.
// panels: dA in panel layout [.][rows][NR]; panel gate * np + q holds dA_in's block q of that gate, and
// hidden_panel(i) names the panel holding dA_hidden's i-th. Working memory: acc_i [F][gates up], acc_h [H][gates up],
// ax [F kc], ah [H kc]. Writes its units' columns of dwi [F, gates H] and dwh [H, gates H].
template <typename HiddenPanel>
void weight_gradients(const float* x, const float* hs, const float* h0, int64_t B, int64_t F, int64_t H, int64_t rows,
                      int64_t kc, int64_t gates, const Part& pt, const float* panels, HiddenPanel hidden_panel,
                      float* acc_i, float* acc_h, float* ax, float* ah, float* tile, float* dwi, float* dwh) {
  const int64_t np = pt.panels, up = np * NR, cols = gates * up, G = gates * H;
  std::fill(acc_i, acc_i + F * cols, 0.0f);
  std::fill(acc_h, acc_h + H * cols, 0.0f);
  for (int64_t k0 = 0; k0 < rows; k0 += kc) {
    const int64_t kk = std::min(kc, rows - k0);
    pack_transposed(x, F, k0, kk, F, ax);
    pack_transposed_shifted(hs, h0, B, H, k0, kk, ah);
    for (int64_t pi = 0; pi < gates * np; ++pi) {
      accumulate_product(ax, F, kk, panels + (pi * rows + k0) * NR, acc_i + pi * NR, cols, tile);
      accumulate_product(ah, H, kk, panels + (hidden_panel(pi) * rows + k0) * NR, acc_h + pi * NR, cols, tile);
    }
  }
  for (int64_t g = 0; g < gates; ++g)
    for (int64_t u = 0; u < pt.units(); ++u) {
      for (int64_t f = 0; f < F; ++f) dwi[f * G + g * H + pt.u0 + u] = acc_i[f * cols + g * up + u];
      for (int64_t v = 0; v < H; ++v) dwh[v * G + g * H + pt.u0 + u] = acc_h[v * cols + g * up + u];
    }
}  // depth of the weight gradients' blocks

// Threads for a layer whose step does `step_flops` multiply-adds: one per core, at most one per block of units, and
// none with less than kMinStepWork of a step's products to do, since below that the barrier costs more than the
// thread gains (measured: B=8 H=64 F=32 ran 3-6x slower on two threads than on one).
constexpr int64_t kMinStepWork = int64_t{1} << 20;

inline int64_t team_size(int64_t H, int64_t step_flops) {
  const int64_t by_work = std::max<int64_t>(1, step_flops / kMinStepWork);
  return std::max<int64_t>(1, std::min({seqjax::usable_cores(), (H + NR - 1) / NR, by_work}));
}

// Clamped: under -ffast-math GCC vectorises 1 / (1 + e) as a reciprocal estimate and a Newton step, which gives NaN
// for e = inf (x < -88.7); the logistic of +-80 is already 1 and 1.8e-35.
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-std::min(std::max(x, -80.0f), 80.0f))); }

struct Dims {
  int64_t T, B, F, H;
};

// The layer's sizes from xs [T, B, F], w_ih [F, gates H] and w_hh [H, gates H].
inline ffi::Error check_layer(const char* kernel, int64_t gates, ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& w_ih,
                              ffi::Buffer<ffi::F32>& w_hh, Dims* d) {
  auto x = xs.dimensions();
  auto wi = w_ih.dimensions();
  auto wh = w_hh.dimensions();
  if (x.size() != 3 || wi.size() != 2 || wh.size() != 2 || wi[0] != x[2] || wh[1] != gates * wh[0] ||
      wi[1] != wh[1])
    return ffi::Error::InvalidArgument(std::string(kernel) + ": expected xs [T, B, F], w_ih [F, G H], w_hh [H, G H]");
  *d = Dims{x[0], x[1], x[2], wh[0]};
  return ffi::Error::Success();
}

// Whether each buffer has the dimensions given beside it.
using ExpectedShapes = std::initializer_list<std::pair<ffi::Buffer<ffi::F32>*, std::vector<int64_t>>>;

inline ffi::Error check_shapes(const char* kernel, ExpectedShapes expected) {
  for (const auto& [buffer, dims] : expected) {
    auto got = buffer->dimensions();
    if (got.size() != dims.size() || !std::equal(dims.begin(), dims.end(), got.begin()))
      return ffi::Error::InvalidArgument(std::string(kernel) + ": an argument's shape does not match xs and weights");
  }
  return ffi::Error::Success();
}

}  // namespace seqjax::rnn
