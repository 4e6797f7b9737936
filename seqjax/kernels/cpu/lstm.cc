// seqjax's CPU kernel for an LSTM layer over a whole sequence, forward and backward, as XLA FFI custom calls
// (BENCHMARKS.md has why and what it gains).
//
// Layouts (row-major, time-major as the layer's scans): xs [T, B, F], c0 and h0 [B, H], w_ih [F, 4H], w_hh [H, 4H],
// b [4H], gates in PyTorch's order i, f, g, o (column g * H + u is gate g of hidden unit u). The forward writes
// hs [T, B, H], c_T and h_T [B, H], and, for the backward, acts [T, B, 4H] (the four gates after their
// non-linearities, same column order) and cs [T, B, H] (the cell states). The backward takes those with the
// cotangents dys [T, B, H], dc_T, dh_T and writes dxs [T, B, F], dc0, dh0, dw_ih, dw_hh and db.
//
// Equations per step: a = x_t W_ih + h W_hh + b; i, f, o = sigmoid(a_i, a_f, a_o); g = tanh(a_g);
// c' = f c + i g; h' = o tanh(c'). Backward: dc = dc' + dh o (1 - tanh(c')^2); dA = [dc g i (1 - i),
// dc c f (1 - f), dc i (1 - g^2), dh tanh(c') o (1 - o)]; dh_prev = dA W_hh^T; dc_prev = dc f.
//
// Threads: the hidden units are split between one thread per core, in blocks of 16 units; each thread owns the four
// gates' columns of its units. A forward step is, per thread, x_t W_ih + h W_hh on its columns and then its units'
// gate loop; a backward step is its units' gate loop (giving dA on its columns), then dA W_hh^T on its units (their
// dh) and dA W_ih^T on its share of the inputs (dx). One barrier per step makes the step's h (dA) whole before the
// products read it. After the backward's steps, each thread computes its columns of dW_ih = x^T dA and
// dW_hh = h_prev^T dA over all steps at once.
// Every product runs on one register-tiled AVX2/FMA micro-kernel (a 6 x 16 tile), over weights packed once per
// call and over h, x and dA written packed as they are produced: on the per-step shapes (a [64, 256] x [256, 1024]
// product) it measured faster than OpenBLAS and than XLA's dots. The working arrays come from a pool kept between
// calls, so that their pages are not faulted in again on every call.

#include "recurrent.h"

namespace ffi = xla::ffi;

namespace {

using namespace seqjax::rnn;  // NOLINT: the kernels' shared vocabulary

constexpr const char* kName = "seqjax LSTM kernel";

// One batch row of a step's gates for n units: pre-activations a* plus biases b*, the cell state c (updated in
// place); writes h and the gates and the new cell state. Separate restrict pointers let GCC vectorise it (libmvec's
// expf and tanhf under -ffast-math).
void gate_row(const float* __restrict ai, const float* __restrict af, const float* __restrict ag,
              const float* __restrict ao, const float* __restrict bi, const float* __restrict bf,
              const float* __restrict bg, const float* __restrict bo, float* __restrict c, float* __restrict h,
              float* __restrict oi, float* __restrict of, float* __restrict og, float* __restrict oo,
              float* __restrict oc, int64_t n) {
  for (int64_t u = 0; u < n; ++u) {
    const float i = sigmoid(ai[u] + bi[u]), f = sigmoid(af[u] + bf[u]), g = std::tanh(ag[u] + bg[u]),
                o = sigmoid(ao[u] + bo[u]);
    const float cn = f * c[u] + i * g;
    c[u] = cn;
    oc[u] = cn;
    h[u] = o * std::tanh(cn);
    oi[u] = i;
    of[u] = f;
    og[u] = g;
    oo[u] = o;
  }
}

// One batch row of a step's backward for n units: the gates, the cell state and the previous one, the output's
// cotangent dy; the carried dh and dc (dc updated in place to the previous step's); writes dA's four parts.
void gate_row_backward(const float* __restrict i_, const float* __restrict f_, const float* __restrict g_,
                       const float* __restrict o_, const float* __restrict c, const float* __restrict cp,
                       const float* __restrict dy, const float* __restrict dh, float* __restrict dc,
                       float* __restrict dai, float* __restrict daf, float* __restrict dag, float* __restrict dao,
                       int64_t n) {
  for (int64_t u = 0; u < n; ++u) {
    const float i = i_[u], f = f_[u], g = g_[u], o = o_[u];
    const float h = dh[u] + dy[u], tc = std::tanh(c[u]);
    const float dcn = dc[u] + h * o * (1.0f - tc * tc);
    dai[u] = dcn * g * i * (1.0f - i);
    daf[u] = dcn * cp[u] * f * (1.0f - f);
    dag[u] = dcn * i * (1.0f - g * g);
    dao[u] = h * tc * o * (1.0f - o);
    dc[u] = dcn * f;
  }
}


}  // namespace

// ---------------------------------------------------------------------------------------------------------------

static ffi::Error Forward(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                          ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> bias,
                          ffi::ResultBuffer<ffi::F32> hs_out, ffi::ResultBuffer<ffi::F32> c_last,
                          ffi::ResultBuffer<ffi::F32> h_last, ffi::ResultBuffer<ffi::F32> acts_out,
                          ffi::ResultBuffer<ffi::F32> cs_out, bool save) {
  Dims d;
  if (auto e = check_layer(kName, 4, xs, w_ih, w_hh, &d); e.failure()) return e;
  const int64_t T = d.T, B = d.B, F = d.F, H = d.H, G = 4 * H;
  if (auto e = check_shapes(kName, {{&c0, {B, H}}, {&h0, {B, H}}, {&bias, {G}}}); e.failure()) return e;
  const float *x = xs.typed_data(), *pc0 = c0.typed_data(), *ph0 = h0.typed_data(), *wi = w_ih.typed_data(),
              *wh = w_hh.typed_data(), *pb = bias.typed_data();
  float *hs = hs_out->typed_data(), *cl = c_last->typed_data(), *hl = h_last->typed_data();
  float *acts = save ? acts_out->typed_data() : nullptr, *cs = save ? cs_out->typed_data() : nullptr;
  if (T == 0 || B == 0) {
    std::copy(pc0, pc0 + B * H, cl);
    std::copy(ph0, ph0 + B * H, hl);
    return ffi::Error::Success();
  }

  return seqjax::guarded(kName, [&] {
    const int64_t workers = team_size(H, B * 4 * H * (F + H)), blocks = (B + MR - 1) / MR;
    std::vector<Part> parts;
    size_t per_thread = 0;
    for (int64_t w = 0; w < workers; ++w) {
      parts.push_back(part(H, w, workers));
      const size_t cols = 4 * parts.back().panels * NR;
      per_thread += Arena::size({F * cols, H * cols, B * cols, B * cols / 4, 5 * cols / 4});
    }
    Arena arena(per_thread + Arena::size({size_t(B * H), size_t(B * H), size_t(B * F), size_t(B * F)}));
    float* packed_h[2] = {arena.take(B * H), arena.take(B * H)};  // the step's h, packed as an A operand
    float* packed_x[2] = {arena.take(B * F), arena.take(B * F)};  // the step's x, packed as an A operand
    struct Work {
      float *wi_panels, *wh_panels, *pre, *cell, *discard;
    };
    std::vector<Work> work(workers);
    for (int64_t w = 0; w < workers; ++w) {
      const int64_t cols = 4 * parts[w].panels * NR;
      // pre: the step's pre-activations [B, 4, up]; discard: where gates go when they are not saved
      work[w] = Work{arena.take(F * cols), arena.take(H * cols), arena.take(B * cols), arena.take(B * cols / 4),
                     arena.take(5 * cols / 4)};
    }
    Barrier barrier(workers);
    auto pack_x = [&](int64_t t, int64_t w) {  // step t's x into packed_x[t % 2], w's share of the row blocks
      pack_row_blocks(x + t * B * F, B, F, blocks * w / workers, blocks * (w + 1) / workers, packed_x[t % 2]);
    };

    run_team(workers, [&](int64_t w) {
      const Part pt = parts[w];
      const int64_t nu = pt.units(), np = pt.panels, up = np * NR, cols = 4 * up;
      const Work& k = work[w];
      // Its columns of W_ih and W_hh as panels, gate-major: panel (g, q) holds units u0 + NR q .. of gate g.
      for (int64_t g = 0; g < 4; ++g) {
        const Part gate{g * H + pt.u0, g * H + pt.u1, np};
        pack_columns_as_panels(wi, F, G, gate, k.wi_panels + g * np * F * NR);
        pack_columns_as_panels(wh, H, G, gate, k.wh_panels + g * np * H * NR);
      }
      for (int64_t b = 0; b < B; ++b) {
        std::copy(pc0 + b * H + pt.u0, pc0 + b * H + pt.u1, k.cell + b * up);
        put_packed(packed_h[0], B, H, b, pt.u0, ph0 + b * H + pt.u0, nu);
      }
      pack_x(0, w);
      barrier.wait();
      alignas(64) float tile[MR * NR];
      for (int64_t t = 0; t < T; ++t) {
        const float *hp = packed_h[t % 2], *xp = packed_x[t % 2];
        float* hn = packed_h[(t + 1) % 2];
        for (int64_t pi = 0; pi < 4 * np; ++pi) {  // pre = x W_ih + h W_hh on its columns
          const float *pw = k.wi_panels + pi * F * NR, *ph = k.wh_panels + pi * H * NR;
          for (int64_t m0 = 0; m0 < B; m0 += MR) {
            const int64_t mr = block_rows(m0, B);
            tile_product(xp + m0 * F, pw, mr, F, tile, hp + m0 * H, ph, H);
            for (int64_t r = 0; r < mr; ++r)
              std::copy(tile + r * NR, tile + (r + 1) * NR, k.pre + (m0 + r) * cols + pi * NR);
          }
        }
        for (int64_t b = 0; b < B; ++b) {
          const float* a = k.pre + b * cols;
          float* hrow = hs + (t * B + b) * H + pt.u0;
          float* act = save ? acts + (t * B + b) * G + pt.u0 : k.discard;
          const int64_t ga = save ? H : up;  // gate stride in act
          float* crow = save ? cs + (t * B + b) * H + pt.u0 : k.discard + 4 * up;
          gate_row(a, a + up, a + 2 * up, a + 3 * up, pb + pt.u0, pb + H + pt.u0, pb + 2 * H + pt.u0,
                   pb + 3 * H + pt.u0, k.cell + b * up, hrow, act, act + ga, act + 2 * ga, act + 3 * ga, crow, nu);
          put_packed(hn, B, H, b, pt.u0, hrow, nu);
        }
        if (t + 1 < T) pack_x(t + 1, w);
        barrier.wait();  // the step's h is whole, and the next step's x packed
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t u = 0; u < nu; ++u) {
          cl[b * H + pt.u0 + u] = k.cell[b * up + u];
          hl[b * H + pt.u0 + u] = hs[((T - 1) * B + b) * H + pt.u0 + u];
        }
    });
  });
}

static ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                              ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> bias,
                              ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> c_last,
                              ffi::ResultBuffer<ffi::F32> h_last, ffi::ResultBuffer<ffi::F32> acts,
                              ffi::ResultBuffer<ffi::F32> cs) {
  return Forward(xs, c0, h0, w_ih, w_hh, bias, hs, c_last, h_last, acts, cs, true);
}

static ffi::Error InferenceImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                                ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> bias,
                                ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> c_last,
                                ffi::ResultBuffer<ffi::F32> h_last) {
  return Forward(xs, c0, h0, w_ih, w_hh, bias, hs, c_last, h_last, h_last, h_last, false);
}

static ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> h0,
                               ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> hs_in,
                               ffi::Buffer<ffi::F32> acts_in, ffi::Buffer<ffi::F32> cs_in,
                               ffi::Buffer<ffi::F32> dys_in, ffi::Buffer<ffi::F32> dc_last,
                               ffi::Buffer<ffi::F32> dh_last, ffi::ResultBuffer<ffi::F32> dxs_out,
                               ffi::ResultBuffer<ffi::F32> dc0_out, ffi::ResultBuffer<ffi::F32> dh0_out,
                               ffi::ResultBuffer<ffi::F32> dwi_out, ffi::ResultBuffer<ffi::F32> dwh_out,
                               ffi::ResultBuffer<ffi::F32> db_out) {
  Dims d;
  if (auto e = check_layer(kName, 4, xs, w_ih, w_hh, &d); e.failure()) return e;
  const int64_t T = d.T, B = d.B, F = d.F, H = d.H, G = 4 * H;
  if (auto e = check_shapes(kName, {{&c0, {B, H}}, {&h0, {B, H}}, {&hs_in, {T, B, H}}, {&acts_in, {T, B, G}},
                                    {&cs_in, {T, B, H}}, {&dys_in, {T, B, H}}, {&dc_last, {B, H}}, {&dh_last, {B, H}}});
      e.failure())
    return e;
  const float *x = xs.typed_data(), *pc0 = c0.typed_data(), *ph0 = h0.typed_data(), *wi = w_ih.typed_data(),
              *wh = w_hh.typed_data(), *hs = hs_in.typed_data(), *acts = acts_in.typed_data(),
              *cs = cs_in.typed_data(), *dys = dys_in.typed_data(), *dcl = dc_last.typed_data(),
              *dhl = dh_last.typed_data();
  float *dxs = dxs_out->typed_data(), *dc0 = dc0_out->typed_data(), *dh0 = dh0_out->typed_data(),
        *dwi = dwi_out->typed_data(), *dwh = dwh_out->typed_data(), *db = db_out->typed_data();
  if (T == 0 || B == 0) {
    std::copy(dcl, dcl + B * H, dc0);
    std::copy(dhl, dhl + B * H, dh0);
    std::fill(dwi, dwi + F * G, 0.0f);
    std::fill(dwh, dwh + H * G, 0.0f);
    std::fill(db, db + G, 0.0f);
    return ffi::Error::Success();
  }

  return seqjax::guarded(kName, [&] {
    const int64_t workers = team_size(H, B * 4 * H * (F + H)), rows = T * B, kc = std::min<int64_t>(KC, rows);
    std::vector<Part> parts, fparts;
    size_t per_thread = 0;
    for (int64_t w = 0; w < workers; ++w) {
      parts.push_back(part(H, w, workers));
      fparts.push_back(part(F, w, workers));
      const size_t up = parts.back().panels * NR, fp = fparts.back().panels * NR;
      per_thread += Arena::size({G * up, G * fp, rows * 4 * up, B * up, B * up, 4 * up, 4 * up, F * 4 * up,
                                 H * 4 * up, size_t(F * kc), size_t(H * kc)});
    }
    Arena arena(per_thread + Arena::size({size_t(B * G), size_t(B * G)}));
    float* packed_da[2] = {arena.take(B * G), arena.take(B * G)};  // the step's dA, packed as the A operand
    struct Work {
      float *wh_panels, *wi_panels, *da_panels, *dh, *dc, *dbias, *row, *acc_i, *acc_h, *ax, *ah;
    };
    std::vector<Work> work(workers);
    for (int64_t w = 0; w < workers; ++w) {
      const int64_t up = parts[w].panels * NR, fp = fparts[w].panels * NR;
      work[w] = Work{arena.take(G * up), arena.take(G * fp), arena.take(rows * 4 * up), arena.take(B * up),
                     arena.take(B * up), arena.take(4 * up), arena.take(4 * up), arena.take(F * 4 * up),
                     arena.take(H * 4 * up), arena.take(F * kc), arena.take(H * kc)};
    }
    Barrier barrier(workers);

    run_team(workers, [&](int64_t w) {
      const Part pt = parts[w], fpt = fparts[w];
      const int64_t nu = pt.units(), up = pt.panels * NR, np = pt.panels;
      const Work& k = work[w];
      // Panels of W_hh^T's columns for its units (dh = dA W_hh^T) and of W_ih^T's for its share of the inputs
      // (dx = dA W_ih^T): panel q holds row u0 + NR q + j of the weight at [k][j].
      pack_rows_as_panels(wh, G, pt, k.wh_panels);
      pack_rows_as_panels(wi, G, fpt, k.wi_panels);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t u = 0; u < nu; ++u) {
          k.dh[b * up + u] = dhl[b * H + pt.u0 + u];
          k.dc[b * up + u] = dcl[b * H + pt.u0 + u];
        }
      std::fill(k.dbias, k.dbias + 4 * up, 0.0f);
      alignas(64) float tile[MR * NR];
      for (int64_t t = T - 1; t >= 0; --t) {
        float* pa = packed_da[t % 2];
        for (int64_t b = 0; b < B; ++b) {
          const int64_t r = t * B + b;
          const float *act = acts + r * G + pt.u0, *c = cs + r * H + pt.u0, *dy = dys + r * H + pt.u0;
          const float* cp = t > 0 ? cs + (r - B) * H + pt.u0 : pc0 + b * H + pt.u0;
          float* da = k.row;  // [4, up]
          gate_row_backward(act, act + H, act + 2 * H, act + 3 * H, c, cp, dy, k.dh + b * up, k.dc + b * up, da,
                            da + up, da + 2 * up, da + 3 * up, nu);
          for (int64_t g = 0; g < 4; ++g) {
            const float* dag = da + g * up;
            float* dbg = k.dbias + g * up;
            for (int64_t u = 0; u < nu; ++u) dbg[u] += dag[u];
            put_packed(pa, B, G, b, g * H + pt.u0, dag, nu);
            put_panel_row(k.da_panels + g * np * rows * NR, np, rows, r, dag, nu);  // for the weight gradients
          }
        }
        barrier.wait();  // the step's dA is whole
        for (int64_t m0 = 0; m0 < B; m0 += MR) {
          const int64_t mr = block_rows(m0, B);
          for (int64_t q = 0; q < np; ++q) {  // dh_prev for its units
            const int64_t n = std::min(NR, nu - NR * q);
            tile_product(pa + m0 * G, k.wh_panels + q * G * NR, mr, G, tile);
            for (int64_t i = 0; i < mr; ++i) std::copy(tile + i * NR, tile + i * NR + n, k.dh + (m0 + i) * up + NR * q);
          }
          for (int64_t q = 0; q < fpt.panels; ++q) {  // dx for its inputs
            const int64_t n = std::min(NR, fpt.units() - NR * q);
            tile_product(pa + m0 * G, k.wi_panels + q * G * NR, mr, G, tile);
            for (int64_t i = 0; i < mr; ++i)
              std::copy(tile + i * NR, tile + i * NR + n, dxs + (t * B + m0 + i) * F + fpt.u0 + NR * q);
          }
        }
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t u = 0; u < nu; ++u) {
          dh0[b * H + pt.u0 + u] = k.dh[b * up + u];
          dc0[b * H + pt.u0 + u] = k.dc[b * up + u];
        }
      for (int64_t g = 0; g < 4; ++g)
        for (int64_t u = 0; u < nu; ++u) db[g * H + pt.u0 + u] = k.dbias[g * up + u];
      // dW_ih = x^T dA and dW_hh = h_prev^T dA over all steps at once, for its units' columns.
      weight_gradients(x, hs, ph0, B, F, H, rows, kc, 4, pt, k.da_panels, [](int64_t i) { return i; }, k.acc_i,
                       k.acc_h, k.ax, k.ah, tile, dwi, dwh);
    });
  });
}

extern "C" int seqjax_recurrent_vectorised() { return kVectorised ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLstmForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // acts
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cs
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLstmInference, InferenceImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLstmBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // acts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dc_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dxs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_ih
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_hh
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db
);
