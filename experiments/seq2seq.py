"""seq2seq: the encoder-decoder Transformer on `seq_tasks` (default: reverse; also copy, sort, trim, omit, permute,
addition) or on translation (`--config experiments/configs/seq2seq.py:translation`: TED talks Portuguese ->
English, `ted_hrlr_translate/pt_to_en`, with a SentencePiece vocabulary trained on both languages).

    python -m experiments.seq2seq --workdir runs/seq2seq [--config.task=sort] [--config.model.num_layers=4]

Trains with teacher forcing (cross-entropy on the target tokens), then decodes the held-out split greedily and
with beam search: summary.json holds the exact-match accuracy of both (a sequence counts only if every token and
the end-of-sequence are right); for translation also corpus BLEU (4-gram, brevity penalty). Pictures: curves.png
(losses), attention.png (the last decoder layer's cross-attention for one held-out example, one panel per head:
reversal draws an anti-diagonal), examples.txt.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import PipelineTask, dropout_kwargs, run
from seqjax import decoding
from seqjax.data import datasets
from seqjax.data.builders import build, seq_tasks
from seqjax.data.pipeline import Pipeline, Seq2SeqCollate
from seqjax.data.sources import data_dir, head
from seqjax.data.tokenizers import BOS, EOS
from seqjax.models import Seq2SeqStep, Transformer, TransformerConfig, seq2seq_state
from seqjax.plotting import attention_weights, plot_attention
from seqjax.training import cross_entropy
from seqjax.training.vectorized import hparam


def corpus_bleu(hypotheses: list[list[str]], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) with one reference per sentence, in percent: the geometric mean of the
    clipped n-gram precisions for n = 1..max_n, times the brevity penalty."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


class Seq2SeqTask(PipelineTask):
    # A vectorised sweep may vary these between stacked trials: label smoothing is read through `hparam` (a traced
    # scalar there), the data seed only changes which examples the (same-shaped) batches hold.
    vectorizable = ("label_smoothing", "data_seed")

    def __init__(self, config):
        self.config = config
        if config.dataset == "seq_tasks":
            sources, vocab = self._seq_task_sources(config)
        else:
            sources, vocab = self._translation_sources(config)
        self.eos = vocab["eos"]
        max_len = max(self.input_len, self.target_len)
        self.model = Transformer(TransformerConfig(**config.model, vocab_size=vocab["size"], max_len=max_len))
        collate = Seq2SeqCollate(vocab["bos"], self.eos, self.input_len, self.target_len)
        self.pipeline = Pipeline(sources["train"], config.batch_size, seed=config.seed, collate=collate, prefetch=2)
        self.test = collate(head(sources["test"], config.num_eval_examples))

    def _translation_sources(self, config):
        d = data_dir(config)
        train, self.tokenizer, _ = datasets.translation(config.dataset, "train", config.subword_vocab_size, data_dir=d)
        test, _, _ = datasets.translation(config.dataset, config.eval_split, config.subword_vocab_size, data_dir=d)
        self.input_len, self.target_len = config.max_len, config.max_len + 1
        return {"train": train, "test": test}, {"bos": BOS, "eos": EOS, "size": self.tokenizer.vocab_size}

    def _seq_task_sources(self, config):
        self.tokenizer = None
        data = seq_tasks.config(
            config.task,
            num_train=config.num_train_examples,
            num_test=config.num_eval_examples,
            seed=config.data_seed,
            vocab_size=config.vocab_size,
            min_len=config.min_len,
            max_len=config.max_len,
            max_digits=config.max_digits,
        )
        sources = build("seq_tasks", data_dir(config), data).as_data_source()
        if config.task == "addition":
            self.input_len, self.target_len = 2 * config.max_digits + 1, config.max_digits + 2
        else:
            self.input_len, self.target_len = config.max_len, config.max_len + 1  # + eos
        return sources, seq_tasks.vocabulary(data)

    def init(self, rng):
        x = jnp.zeros((1, self.input_len), jnp.int32)
        y = jnp.zeros((1, self.target_len), jnp.int32)
        return jax.jit(self.model.init)(rng, x, y)["params"], {}

    def _loss(self, params, batch, rng=None):
        logits = self.model.apply({"params": params}, batch["inputs"], batch["labels"], **dropout_kwargs(rng))
        smoothing = hparam(self.config, "label_smoothing") if rng is not None else 0.0
        # Means: summed over devices and eval batches before dividing by the real tokens (seqjax.training.metrics).
        return cross_entropy(logits, batch["labels"], weights=batch["weights"], label_smoothing=smoothing, as_mean=True)

    def loss_fn(self, params, model_state, batch, rng):
        loss, aux = self._loss(params, batch, rng)
        return loss, ({"token_accuracy": aux["accuracy"]}, model_state)

    def metric_fn(self, params, model_state, batch):
        loss, aux = self._loss(params, batch)
        return {"loss": loss, "token_accuracy": aux["accuracy"]}

    def report(self, params, model_state, workdir):
        inputs, labels = jnp.asarray(self.test["inputs"]), self.test["labels"]
        step = Seq2SeqStep(self.model)
        state = seq2seq_state(self.model, params, inputs, self.target_len)
        start = jnp.zeros((len(inputs), 1), jnp.int32)
        greedy = np.asarray(decoding.greedy(step, state, start, self.target_len, eos_id=self.eos))
        beams, _ = decoding.beam_search(
            step, state, start, self.target_len, beam_size=self.config.beam_size, eos_id=self.eos
        )
        best = np.asarray(beams[:, 0])
        out = {
            "exact_match_greedy": float(np.mean(np.all(greedy == labels, axis=1))),
            f"exact_match_beam{self.config.beam_size}": float(np.mean(np.all(best == labels, axis=1))),
        }
        if self.tokenizer is not None:  # translation: BLEU on words of the decoded text
            refs = [self.tokenizer.decode(t).split() for t in labels]
            out["bleu_greedy"] = corpus_bleu([self.tokenizer.decode(t).split() for t in greedy], refs)
            out[f"bleu_beam{self.config.beam_size}"] = corpus_bleu(
                [self.tokenizer.decode(t).split() for t in best], refs
            )
        if workdir is not None:
            self._pictures(params, greedy, workdir)
        return out

    def _pictures(self, params, greedy, workdir):
        x, y = self.test["inputs"][:1], self.test["labels"][:1]
        weights = attention_weights(self.model, {"params": params}, jnp.asarray(x), jnp.asarray(y))
        last = sorted(k for k in weights if "cross_attention" in k)[-1]
        n_in, n_out = int((x[0] != 0).sum()), int((y[0] != 0).sum())
        what = self.config.task if self.tokenizer is None else self.config.dataset

        def name(t):
            if t == self.eos:
                return "eos"
            return str(int(t)) if self.tokenizer is None else (self.tokenizer.decode([int(t)]) or "·")

        plot_attention(
            weights[last][0][:, :n_out, :n_in],
            os.path.join(workdir, "attention.png"),
            query_labels=[name(t) for t in y[0, :n_out]],
            key_labels=[name(t) for t in x[0, :n_in]],
            title=f"{what}: cross-attention of the last decoder layer ({last.split('/')[-2]})",
        )
        with open(os.path.join(workdir, "examples.txt"), "w") as f:
            for i in range(min(10, len(greedy))):
                src = self.test["inputs"][i][self.test["inputs"][i] != 0].tolist()
                hyp, ref = _until_eos(greedy[i], self.eos), _until_eos(self.test["labels"][i], self.eos)
                if self.tokenizer is not None:
                    src, hyp, ref = (self.tokenizer.decode(t) for t in (src, hyp, ref))
                f.write(f"input {src} -> greedy {hyp} (target {ref})\n")


def _until_eos(tokens, eos):
    tokens = list(np.asarray(tokens).tolist())
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


TASK, CONFIG = Seq2SeqTask, "seq2seq.py"  # what experiments.sweep runs


def main():
    run(TASK, CONFIG)


if __name__ == "__main__":
    main()
