// seqjax's CPU kernel for a GRU layer over a whole sequence, forward and backward, as XLA FFI custom calls: the LSTM
// kernel's design (lstm.cc, docs/ARCHITECTURE.md) with PyTorch's GRU.
//
// Layouts (row-major, time-major): xs [T, B, F], h0 [B, H], w_ih [F, 3H], w_hh [H, 3H], b_ih and b_hh [3H], gates in
// PyTorch's order r, z, n (column g * H + u is gate g of hidden unit u). The forward writes hs [T, B, H], h_T, and,
// for the backward, acts [T, B, 4H]: r, z, n and hn (the hidden product's n part, h W_hh_n + b_hh_n). The backward
// takes those with the cotangents dys [T, B, H] and dh_T and writes dxs [T, B, F], dh0, dw_ih, dw_hh, db_ih, db_hh.
//
// Equations per step: r = sigmoid(x W_ih_r + b_ih_r + h W_hh_r + b_hh_r), z likewise, hn = h W_hh_n + b_hh_n,
// n = tanh(x W_ih_n + b_ih_n + r hn), h' = (1 - z) n + z h. Backward, with dh the cotangent of h':
// dA_n = dh (1 - z) (1 - n^2), dA_r = dA_n hn r (1 - r), dA_z = dh (h - n) z (1 - z); the input side's dA is
// [dA_r, dA_z, dA_n], the hidden side's [dA_r, dA_z, dA_n r]; dh_prev = dh z + dA_hidden W_hh^T,
// dx = dA_input W_ih^T, dW_ih = x^T dA_input, dW_hh = h_prev^T dA_hidden.
//
// Threads, products and memory as in lstm.cc: each thread owns its hidden units' three gate columns; a forward step
// is x W_ih + h W_hh on its r and z columns (one micro-kernel pass over both products) and the two n products apart,
// then its gate loop; a backward step is its gate loop, one barrier, then dA_hidden W_hh^T for its units and
// dA_input W_ih^T for its share of dx; the weight gradients over all steps come after the loop.

#include "recurrent.h"

namespace ffi = xla::ffi;

namespace {

using namespace seqjax::rnn;  // NOLINT: the kernels' shared vocabulary

constexpr const char* kName = "seqjax GRU kernel";

// One batch row of a step for n units: pre-activations (r and z: both products summed; xn and hn apart), the
// biases (brz: b_ih + b_hh for r and z; bin, bhn), h (updated in place); writes the gates r, z, n, hn and h'.
void gate_row(const float* __restrict pr, const float* __restrict pz, const float* __restrict pxn,
              const float* __restrict phn, const float* __restrict br, const float* __restrict bz,
              const float* __restrict bin, const float* __restrict bhn, float* __restrict h, float* __restrict out,
              float* __restrict orr, float* __restrict oz, float* __restrict on, float* __restrict ohn, int64_t n) {
  for (int64_t u = 0; u < n; ++u) {
    const float r = sigmoid(pr[u] + br[u]), z = sigmoid(pz[u] + bz[u]), hn = phn[u] + bhn[u];
    const float nn = std::tanh(pxn[u] + bin[u] + r * hn);
    const float hnew = (1.0f - z) * nn + z * h[u];
    h[u] = hnew;
    out[u] = hnew;
    orr[u] = r;
    oz[u] = z;
    on[u] = nn;
    ohn[u] = hn;
  }
}

// One batch row of a step's backward for n units: the gates, h_prev, the output's cotangent dy and the carried dh
// (replaced by dh z, to which the product adds dA_hidden W_hh^T); writes dA_r, dA_z, dA_n and dA_n r.
void gate_row_backward(const float* __restrict r_, const float* __restrict z_, const float* __restrict n_,
                       const float* __restrict hn_, const float* __restrict hp, const float* __restrict dy,
                       float* __restrict dh, float* __restrict dar, float* __restrict daz, float* __restrict dan,
                       float* __restrict danr, int64_t n) {
  for (int64_t u = 0; u < n; ++u) {
    const float r = r_[u], z = z_[u], nn = n_[u], g = dh[u] + dy[u];
    const float a_n = g * (1.0f - z) * (1.0f - nn * nn);
    dar[u] = a_n * hn_[u] * r * (1.0f - r);
    daz[u] = g * (hp[u] - nn) * z * (1.0f - z);
    dan[u] = a_n;
    danr[u] = a_n * r;
    dh[u] = g * z;
  }
}



}  // namespace

static ffi::Error Forward(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> w_ih,
                          ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> b_ih, ffi::Buffer<ffi::F32> b_hh,
                          ffi::ResultBuffer<ffi::F32> hs_out, ffi::ResultBuffer<ffi::F32> h_last,
                          ffi::ResultBuffer<ffi::F32> acts_out, bool save) {
  Dims d;
  if (auto e = check_layer(kName, 3, xs, w_ih, w_hh, &d); e.failure()) return e;
  const int64_t T = d.T, B = d.B, F = d.F, H = d.H, G = 3 * H;
  if (auto e = check_shapes(kName, {{&h0, {B, H}}, {&b_ih, {G}}, {&b_hh, {G}}}); e.failure()) return e;
  const float *x = xs.typed_data(), *ph0 = h0.typed_data(), *wi = w_ih.typed_data(), *wh = w_hh.typed_data(),
              *bi = b_ih.typed_data(), *bh = b_hh.typed_data();
  float *hs = hs_out->typed_data(), *hl = h_last->typed_data(), *acts = save ? acts_out->typed_data() : nullptr;
  if (T == 0 || B == 0) {
    std::copy(ph0, ph0 + B * H, hl);
    return ffi::Error::Success();
  }

  return seqjax::guarded(kName, [&] {
    const int64_t workers = team_size(H, B * 3 * H * (F + H)), blocks = (B + MR - 1) / MR;
    std::vector<Part> parts;
    size_t per_thread = 0;
    for (int64_t w = 0; w < workers; ++w) {
      parts.push_back(part(H, w, workers));
      const size_t up = parts.back().panels * NR;
      per_thread += Arena::size({F * 3 * up, H * 3 * up, B * 4 * up, B * up, 4 * up, 4 * up});
    }
    Arena arena(per_thread + Arena::size({size_t(B * H), size_t(B * H), size_t(B * F), size_t(B * F)}));
    float* packed_h[2] = {arena.take(B * H), arena.take(B * H)};  // the step's h, packed as an A operand
    float* packed_x[2] = {arena.take(B * F), arena.take(B * F)};  // the step's x, packed as an A operand
    struct Work {
      float *wi_panels, *wh_panels, *pre, *h, *bias, *discard;
    };
    std::vector<Work> work(workers);
    for (int64_t w = 0; w < workers; ++w) {
      const int64_t up = parts[w].panels * NR;
      // pre: the step's [B, 4, up] (r, z, xn, hn); h: its units' state; bias: [4, up] (r, z summed; b_ih_n; b_hh_n)
      work[w] = Work{arena.take(F * 3 * up), arena.take(H * 3 * up), arena.take(B * 4 * up), arena.take(B * up),
                     arena.take(4 * up), arena.take(4 * up)};
    }
    Barrier barrier(workers);
    auto pack_x = [&](int64_t t, int64_t w) {  // step t's x into packed_x[t % 2], w's share of the row blocks
      pack_row_blocks(x + t * B * F, B, F, blocks * w / workers, blocks * (w + 1) / workers, packed_x[t % 2]);
    };

    run_team(workers, [&](int64_t w) {
      const Part pt = parts[w];
      const int64_t nu = pt.units(), np = pt.panels, up = np * NR, cols = 4 * up;
      const Work& k = work[w];
      for (int64_t g = 0; g < 3; ++g) {  // panel (g, q): units u0 + NR q .. of gate g
        const Part gate{g * H + pt.u0, g * H + pt.u1, np};
        pack_columns_as_panels(wi, F, G, gate, k.wi_panels + g * np * F * NR);
        pack_columns_as_panels(wh, H, G, gate, k.wh_panels + g * np * H * NR);
      }
      for (int64_t u = 0; u < nu; ++u) {
        const int64_t c = pt.u0 + u;
        k.bias[u] = bi[c] + bh[c];
        k.bias[up + u] = bi[H + c] + bh[H + c];
        k.bias[2 * up + u] = bi[2 * H + c];
        k.bias[3 * up + u] = bh[2 * H + c];
      }
      for (int64_t b = 0; b < B; ++b) {
        std::copy(ph0 + b * H + pt.u0, ph0 + b * H + pt.u1, k.h + b * up);
        put_packed(packed_h[0], B, H, b, pt.u0, k.h + b * up, nu);
      }
      pack_x(0, w);
      barrier.wait();
      alignas(64) float tile[MR * NR];
      for (int64_t t = 0; t < T; ++t) {
        const float *hp = packed_h[t % 2], *xp = packed_x[t % 2];
        float* hnext = packed_h[(t + 1) % 2];
        for (int64_t m0 = 0; m0 < B; m0 += MR) {
          const int64_t mr = block_rows(m0, B);
          const float *xa = xp + m0 * F, *ha = hp + m0 * H;
          auto store = [&](int64_t offset) {
            for (int64_t r = 0; r < mr; ++r)
              std::copy(tile + r * NR, tile + (r + 1) * NR, k.pre + (m0 + r) * cols + offset);
          };
          for (int64_t pi = 0; pi < 2 * np; ++pi) {  // r and z: x W_ih + h W_hh
            tile_product(xa, k.wi_panels + pi * F * NR, mr, F, tile, ha, k.wh_panels + pi * H * NR, H);
            store(pi * NR);
          }
          for (int64_t q = 0; q < np; ++q) {  // n: x W_ih_n and h W_hh_n apart
            tile_product(xa, k.wi_panels + (2 * np + q) * F * NR, mr, F, tile);
            store(2 * up + q * NR);
            tile_product(ha, k.wh_panels + (2 * np + q) * H * NR, mr, H, tile);
            store(3 * up + q * NR);
          }
        }
        for (int64_t b = 0; b < B; ++b) {
          const float* a = k.pre + b * cols;
          float* hrow = hs + (t * B + b) * H + pt.u0;
          float* act = save ? acts + (t * B + b) * 4 * H + pt.u0 : k.discard;
          const int64_t ga = save ? H : up;  // gate stride in act
          gate_row(a, a + up, a + 2 * up, a + 3 * up, k.bias, k.bias + up, k.bias + 2 * up, k.bias + 3 * up,
                   k.h + b * up, hrow, act, act + ga, act + 2 * ga, act + 3 * ga, nu);
          put_packed(hnext, B, H, b, pt.u0, hrow, nu);
        }
        if (t + 1 < T) pack_x(t + 1, w);
        barrier.wait();  // the step's h is whole, and the next step's x packed
      }
      for (int64_t b = 0; b < B; ++b) std::copy(k.h + b * up, k.h + b * up + nu, hl + b * H + pt.u0);
    });
  });
}

static ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> w_ih,
                              ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> b_ih, ffi::Buffer<ffi::F32> b_hh,
                              ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> h_last,
                              ffi::ResultBuffer<ffi::F32> acts) {
  return Forward(xs, h0, w_ih, w_hh, b_ih, b_hh, hs, h_last, acts, true);
}

static ffi::Error InferenceImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> w_ih,
                                ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> b_ih, ffi::Buffer<ffi::F32> b_hh,
                                ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> h_last) {
  return Forward(xs, h0, w_ih, w_hh, b_ih, b_hh, hs, h_last, h_last, false);
}

static ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> w_ih,
                               ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> hs_in, ffi::Buffer<ffi::F32> acts_in,
                               ffi::Buffer<ffi::F32> dys_in, ffi::Buffer<ffi::F32> dh_last,
                               ffi::ResultBuffer<ffi::F32> dxs_out, ffi::ResultBuffer<ffi::F32> dh0_out,
                               ffi::ResultBuffer<ffi::F32> dwi_out, ffi::ResultBuffer<ffi::F32> dwh_out,
                               ffi::ResultBuffer<ffi::F32> dbi_out, ffi::ResultBuffer<ffi::F32> dbh_out) {
  Dims d;
  if (auto e = check_layer(kName, 3, xs, w_ih, w_hh, &d); e.failure()) return e;
  const int64_t T = d.T, B = d.B, F = d.F, H = d.H, G = 3 * H;
  if (auto e = check_shapes(kName, {{&h0, {B, H}}, {&hs_in, {T, B, H}}, {&acts_in, {T, B, 4 * H}},
                                    {&dys_in, {T, B, H}}, {&dh_last, {B, H}}});
      e.failure())
    return e;
  const float *x = xs.typed_data(), *ph0 = h0.typed_data(), *wi = w_ih.typed_data(), *wh = w_hh.typed_data(),
              *hs = hs_in.typed_data(), *acts = acts_in.typed_data(), *dys = dys_in.typed_data(),
              *dhl = dh_last.typed_data();
  float *dxs = dxs_out->typed_data(), *dh0 = dh0_out->typed_data(), *dwi = dwi_out->typed_data(),
        *dwh = dwh_out->typed_data(), *dbi = dbi_out->typed_data(), *dbh = dbh_out->typed_data();
  if (T == 0 || B == 0) {
    std::copy(dhl, dhl + B * H, dh0);
    std::fill(dwi, dwi + F * G, 0.0f);
    std::fill(dwh, dwh + H * G, 0.0f);
    std::fill(dbi, dbi + G, 0.0f);
    std::fill(dbh, dbh + G, 0.0f);
    return ffi::Error::Success();
  }

  return seqjax::guarded(kName, [&] {
    const int64_t workers = team_size(H, B * 3 * H * (F + H)), rows = T * B, kc = std::min<int64_t>(KC, rows);
    std::vector<Part> parts, fparts;
    size_t per_thread = 0;
    for (int64_t w = 0; w < workers; ++w) {
      parts.push_back(part(H, w, workers));
      fparts.push_back(part(F, w, workers));
      const size_t up = parts.back().panels * NR, fp = fparts.back().panels * NR;
      per_thread += Arena::size({G * up, G * fp, rows * 4 * up, B * up, 4 * up, 4 * up, F * 3 * up, H * 3 * up,
                                 size_t(F * kc), size_t(H * kc)});
    }
    Arena arena(per_thread + Arena::size({size_t(B * G), size_t(B * G), size_t(B * G), size_t(B * G)}));
    // The step's dA of the input side (for dx) and of the hidden side (for dh), packed as A operands.
    float* packed_in[2] = {arena.take(B * G), arena.take(B * G)};
    float* packed_hid[2] = {arena.take(B * G), arena.take(B * G)};
    struct Work {
      float *wh_panels, *wi_panels, *da_panels, *dh, *dbias, *row, *acc_i, *acc_h, *ax, *ah;
    };
    std::vector<Work> work(workers);
    for (int64_t w = 0; w < workers; ++w) {
      const int64_t up = parts[w].panels * NR, fp = fparts[w].panels * NR;
      // da_panels: dA_r, dA_z, dA_n and dA_n r of every step in panel layout, [4 np][rows][NR]; dbias [4, up]:
      // the sums of those four
      work[w] = Work{arena.take(G * up),     arena.take(G * fp),     arena.take(rows * 4 * up),
                     arena.take(B * up),     arena.take(4 * up),     arena.take(4 * up),
                     arena.take(F * 3 * up), arena.take(H * 3 * up), arena.take(F * kc),
                     arena.take(H * kc)};
    }
    Barrier barrier(workers);

    run_team(workers, [&](int64_t w) {
      const Part pt = parts[w], fpt = fparts[w];
      const int64_t nu = pt.units(), up = pt.panels * NR, np = pt.panels;
      const Work& k = work[w];
      pack_rows_as_panels(wh, G, pt, k.wh_panels);   // W_hh^T's columns for its units
      pack_rows_as_panels(wi, G, fpt, k.wi_panels);  // W_ih^T's columns for its share of the inputs
      for (int64_t b = 0; b < B; ++b) std::copy(dhl + b * H + pt.u0, dhl + b * H + pt.u1, k.dh + b * up);
      std::fill(k.dbias, k.dbias + 4 * up, 0.0f);
      alignas(64) float tile[MR * NR];
      for (int64_t t = T - 1; t >= 0; --t) {
        float *pin = packed_in[t % 2], *phid = packed_hid[t % 2];
        for (int64_t b = 0; b < B; ++b) {
          const int64_t r = t * B + b;
          const float *act = acts + r * 4 * H + pt.u0, *dy = dys + r * H + pt.u0;
          const float* hp = t > 0 ? hs + (r - B) * H + pt.u0 : ph0 + b * H + pt.u0;
          float* da = k.row;  // [4, up]: dA_r, dA_z, dA_n, dA_n r
          gate_row_backward(act, act + H, act + 2 * H, act + 3 * H, hp, dy, k.dh + b * up, da, da + up,
                            da + 2 * up, da + 3 * up, nu);
          for (int64_t g = 0; g < 3; ++g) {
            put_packed(pin, B, G, b, g * H + pt.u0, da + g * up, nu);
            put_packed(phid, B, G, b, g * H + pt.u0, da + (g == 2 ? 3 : g) * up, nu);
          }
          for (int64_t g = 0; g < 4; ++g) {
            const float* dag = da + g * up;
            float* dbg = k.dbias + g * up;
            for (int64_t u = 0; u < nu; ++u) dbg[u] += dag[u];
            put_panel_row(k.da_panels + g * np * rows * NR, np, rows, r, dag, nu);  // for the weight gradients
          }
        }
        barrier.wait();  // the step's dA is whole
        for (int64_t m0 = 0; m0 < B; m0 += MR) {
          const int64_t mr = block_rows(m0, B);
          for (int64_t q = 0; q < np; ++q) {  // dh_prev = dh z + dA_hidden W_hh^T, for its units
            const int64_t n = std::min(NR, nu - NR * q);
            tile_product(phid + m0 * G, k.wh_panels + q * G * NR, mr, G, tile);
            for (int64_t i = 0; i < mr; ++i) {
              float* dst = k.dh + (m0 + i) * up + NR * q;
              for (int64_t j = 0; j < n; ++j) dst[j] += tile[i * NR + j];
            }
          }
          for (int64_t q = 0; q < fpt.panels; ++q) {  // dx = dA_input W_ih^T, for its inputs
            const int64_t n = std::min(NR, fpt.units() - NR * q);
            tile_product(pin + m0 * G, k.wi_panels + q * G * NR, mr, G, tile);
            for (int64_t i = 0; i < mr; ++i)
              std::copy(tile + i * NR, tile + i * NR + n, dxs + (t * B + m0 + i) * F + fpt.u0 + NR * q);
          }
        }
      }
      for (int64_t b = 0; b < B; ++b) std::copy(k.dh + b * up, k.dh + b * up + nu, dh0 + b * H + pt.u0);
      for (int64_t g = 0; g < 3; ++g)
        for (int64_t u = 0; u < nu; ++u) {
          dbi[g * H + pt.u0 + u] = k.dbias[g * up + u];
          dbh[g * H + pt.u0 + u] = k.dbias[(g == 2 ? 3 : g) * up + u];
        }
      // dW_ih = x^T dA_input and dW_hh = h_prev^T dA_hidden over all steps, for its units' columns: the hidden
      // side's n panels are the dA_n r ones.
      auto hidden_panel = [np](int64_t i) { return i < 2 * np ? i : i + np; };
      weight_gradients(x, hs, ph0, B, F, H, rows, kc, 3, pt, k.da_panels, hidden_panel, k.acc_i, k.acc_h, k.ax, k.ah,
                       tile, dwi, dwh);
    });
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxGruForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_hh
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // acts
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxGruInference, InferenceImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_hh
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxGruBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // acts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dxs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_ih
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_hh
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db_ih
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db_hh
);
