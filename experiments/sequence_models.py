"""sequence_models: the classical sequence models and the recurrent layers forecast the same series.

    python -m experiments.sequence_models --workdir runs/sequence_models

Models, each mapping a series x [B, T] to one-step-ahead predictions x̂_t from x_1..x_{t-1}: naive (an MLP on the
whole past), autoregressive over a fixed window τ, first-order Markov, latent autoregressive (a GRU-cell state
summarising the past), and the stacked RNN / LSTM / GRU layers with a linear read-out. They train side by side in
one run on the same batches (one summed loss; each model's gradients touch only its own parameters and Adam is
per parameter, so it is the same as training them apart; gradient clipping is off for that reason).

The default series has long memory: x_t = 0.3 x_{t-1} + 0.6 x_{t-12} + ε_t (`time_series` builder, AR(12)), so a
window of τ = 4 cannot see the lag that matters while a hidden state can carry it. The oracle row uses the true
coefficients: its error is the noise variance, the best any model can do.

summary.json and errors.md: the test MSE of one-step predictions (t >= 16) and of k-step-ahead forecasts from a
48-step prefix. predictions.png: one test series, the truth against each model's forecasts. gradients.png: the mean
|∂x̂_T / ∂x_{T-t}| of the recurrent models against t (vanishing gradients in the simple RNN, not in the LSTM/GRU).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import PipelineTask, eval_chunks, run
from seqjax.data.builders import build, time_series
from seqjax.data.pipeline import Pipeline, stack
from seqjax.data.sources import data_dir, head
from seqjax.models.classical import (
    AutoregressiveModel,
    LatentAutoregressiveModel,
    MarkovModel,
    NaiveModel,
    predict_ahead,
)
from seqjax.nn import GRU, LSTM, SimpleRNN

RECURRENT = ("latent_ar", "rnn", "lstm", "gru")


class RecurrentPredictor(nn.Module):
    """x̂_t = W h_t + b with h_t from a stacked recurrent layer run over x_{t-1} (x_0 = 0)."""

    layer: type
    hidden: int

    @nn.compact
    def __call__(self, x):
        prev = jnp.pad(x, ((0, 0), (1, 0)))[:, :-1, None]
        h, _ = self.layer(self.hidden)(prev)
        return nn.Dense(1)(h)[..., 0]


def make_models(max_len: int, hidden: int, tau: int) -> dict[str, nn.Module]:
    """The seven predictors: each of width `hidden`; the naive one over series of up to `max_len` steps, the
    autoregressive one over a window of `tau` (`config.model` holds hidden and tau, the task adds max_len)."""
    h = hidden
    return {
        "naive": NaiveModel(max_len=max_len, hidden=h),
        "autoregressive": AutoregressiveModel(tau=tau, hidden=h),
        "markov": MarkovModel(hidden=h),
        "latent_ar": LatentAutoregressiveModel(hidden=h),
        "rnn": RecurrentPredictor(SimpleRNN, h),
        "lstm": RecurrentPredictor(LSTM, h),
        "gru": RecurrentPredictor(GRU, h),
    }


class SequenceModelsTask(PipelineTask):
    def __init__(self, config):
        self.config = config
        self.coefficients = tuple(float(a) for a in config.ar_coefficients)
        data = time_series.TimeSeriesConfig(
            name=f"ar{len(self.coefficients)}-T{config.length}-n{config.num_train_examples}-s{config.data_seed}",
            kind="ar",
            ar_coefficients=self.coefficients,
            length=config.length,
            noise_std=config.noise_std,
            num_train=config.num_train_examples,
            num_test=config.num_eval_examples,
            seed=config.data_seed,
        )
        sources = build("time_series", data_dir(config), data).as_data_source()
        self.pipeline = Pipeline(sources["train"], config.batch_size, seed=config.seed, collate=stack, prefetch=2)
        self.test = stack(head(sources["test"]))["series"]
        self.models = make_models(config.length, **config.model)

    def init(self, rng):
        x = jnp.zeros((1, self.config.length))
        return {
            n: jax.jit(m.init)(jax.random.fold_in(rng, i), x)["params"] for i, (n, m) in enumerate(self.models.items())
        }, {}

    def _errors(self, params, series):
        start = self.config.score_from
        return {
            n: jnp.mean((m.apply({"params": params[n]}, series) - series)[:, start:] ** 2)
            for n, m in self.models.items()
        }

    def loss_fn(self, params, model_state, batch, rng):
        errors = self._errors(params, batch["series"])
        return sum(errors.values()), ({f"mse_{n}": e for n, e in errors.items()}, model_state)

    def eval_batches(self):
        return eval_chunks({"series": self.test}, self.config.eval_batch_size)

    def metric_fn(self, params, model_state, batch):
        errors = self._errors(params, batch["series"])
        return {"loss": sum(errors.values()), **{f"mse_{n}": e for n, e in errors.items()}}

    def _oracle(self, series):
        """One-step predictions from the true coefficients."""
        a = np.asarray(self.coefficients)
        padded = np.pad(series, ((0, 0), (len(a), 0)))
        return sum(a[j] * padded[:, len(a) - 1 - j : len(a) - 1 - j + series.shape[1]] for j in range(len(a)))

    def report(self, params, model_state, workdir):
        cfg, x = self.config, np.asarray(self.test[:512])
        one_step = {n: float(v) for n, v in jax.device_get(self._errors(params, jnp.asarray(x))).items()}
        one_step["oracle"] = float(np.mean((self._oracle(x) - x)[:, cfg.score_from :] ** 2))
        prefix, k = cfg.forecast_from, cfg.horizon
        forecasts = {
            n: np.asarray(
                jax.jit(predict_ahead, static_argnums=(0, 3))(m, {"params": params[n]}, jnp.asarray(x[:, :prefix]), k)
            )
            for n, m in self.models.items()
        }
        ahead = {n: np.mean((f - x[:, prefix : prefix + k]) ** 2, axis=0) for n, f in forecasts.items()}
        summary = {f"one_step_mse_{n}": v for n, v in one_step.items()}
        summary.update({f"{k}_step_mse_{n}": float(v[-1]) for n, v in ahead.items()})
        if workdir is not None:
            _write_table(one_step, ahead, k, os.path.join(workdir, "errors.md"))
            self._plot_predictions(params, x[0], forecasts, os.path.join(workdir, "predictions.png"))
            self._plot_gradients(params, x[:64], os.path.join(workdir, "gradients.png"))
        return summary

    def _plot_predictions(self, params, series, forecasts, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cfg = self.config
        names = list(self.models)
        fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.6 * len(names)), sharex=True)
        t = np.arange(cfg.length)
        for ax, n in zip(axes, names, strict=True):
            one = np.asarray(self.models[n].apply({"params": params[n]}, jnp.asarray(series[None])))[0]
            ax.plot(t, series, color="black", lw=1, label="truth")
            ax.plot(t[1:], one[1:], color="tab:blue", lw=1, label="one step ahead")
            ft = np.arange(cfg.forecast_from, cfg.forecast_from + cfg.horizon)
            ax.plot(ft, forecasts[n][0], color="tab:red", lw=1.5, marker=".", label=f"{cfg.horizon} steps ahead")
            ax.axvline(cfg.forecast_from - 0.5, color="grey", ls=":", lw=1)
            ax.set_ylabel(n, fontsize=8)
        axes[0].legend(fontsize=7, ncol=3, loc="upper left")
        axes[-1].set_xlabel("time step t")
        fig.suptitle("One test series: truth, one-step predictions, and forecasts from the dotted line", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def _plot_gradients(self, params, series, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        last = series.shape[1] - 1
        for n in RECURRENT:
            model = self.models[n]
            grad = jax.grad(lambda s, n=n, model=model: model.apply({"params": params[n]}, s)[:, last].sum())
            g = np.mean(np.abs(np.asarray(grad(jnp.asarray(series)))), axis=0)  # [T]: d x̂_last / d x_j
            back = np.arange(1, last + 1)
            ax.semilogy(back, np.maximum(g[last - back], 1e-12), label=n)
        ax.set_xlabel("t (input x_{T-t}, steps back from the prediction)")
        ax.set_ylabel("mean |∂x̂_T / ∂x_{T-t}|")
        ax.set_title("How far back the trained recurrent models look", fontsize=10)
        ax.axvline(12, color="grey", ls=":", lw=1)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _write_table(one_step, ahead, k, path):
    lines = [f"| model | one-step MSE | {k}-step-ahead MSE |", "| --- | ---: | ---: |"]
    for n in sorted(one_step, key=one_step.get):
        lines.append(
            f"| {n} | {one_step[n]:.3f} | {ahead[n][-1]:.3f} |" if n in ahead else f"| {n} | {one_step[n]:.3f} | |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


TASK, CONFIG = SequenceModelsTask, "sequence_models.py"  # what experiments.sweep runs


def main():
    run(TASK, CONFIG)


if __name__ == "__main__":
    main()
