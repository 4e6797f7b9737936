"""Language-model data and evaluation shared by `lm` (Transformer) and `rnn_lm` (recurrent): character-level
`synthetic_text` (sentences of a probabilistic grammar, so samples can be parsed) or `tiny_shakespeare`, and
SentencePiece subwords on `lm1b`; synthetic_text also as words (`config.tokens="word"`); or your own UTF-8 files
(`dataset="text"`, `text_files="DIR/*.txt"`, characters or bytes: seqjax.data.text_files).

Batches: `inputs` = ids[:-1], `targets` = ids[1:], `weights` 1 on real target tokens. A sentence is
[bos] + tokens + [eos], padded; tiny_shakespeare and text files are cut into windows. Evaluation: perplexity =
exp(mean token cross-entropy) on the test split; at the end, samples from [bos] until eos, written to samples.txt,
and for synthetic_text the grammaticality rate (the share of samples the grammar's parser accepts).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import PipelineTask
from seqjax import decoding
from seqjax.data import datasets, text_files
from seqjax.data.builders import build, synthetic_text
from seqjax.data.pipeline import Mapped, Pipeline, pad, stack
from seqjax.data.sources import data_dir, head
from seqjax.data.tokenizers import BOS, EOS, PAD, CharTokenizer, WordTokenizer
from seqjax.errors import ConfigError
from seqjax.training import cross_entropy

DATASETS = ("synthetic_text", "tiny_shakespeare", "lm1b", "text")


def text_config(c) -> None:
    """The data fields of both LM experiments."""
    c.dataset = "synthetic_text"  # synthetic_text | tiny_shakespeare | lm1b | text (your files: text_files)
    c.tokens = "char"  # synthetic_text: "char" | "word"; text: "char" ("word" too) | "byte"
    c.text_files = ""  # text: glob patterns of UTF-8 files, comma-separated; chars cached in DATA_DIR/seqjax
    c.eval_files = ""  # text: held-out files (globs); "": the last eval_fraction of each text file
    c.eval_fraction = 0.1  # text without eval_files: the held-out share of each file, in (0, 1)
    c.seq_len = 80  # tokens per example (sentences longer than this are cut)
    c.max_depth = 3  # synthetic_text: the grammar's recursion depth
    c.num_train_examples = 20_000  # synthetic_text
    c.num_eval_examples = 512
    c.data_seed = 0
    c.vocab_size = 8000  # lm1b's SentencePiece vocabulary
    c.eval_batch_size = 256
    c.num_samples = 256  # sampled at the end
    c.sample_temperature = 1.0


class TextLMTask(PipelineTask):
    """Data, loss, metrics and report; subclasses set `self.model` and define `_logits` and `_sample`."""

    def __init__(self, config):
        self.config = config
        if config.dataset not in DATASETS:
            raise ConfigError("dataset", f"{config.dataset!r} is unknown (one of {', '.join(DATASETS)})")
        n, d = config.seq_len, data_dir(config)
        if config.dataset == "synthetic_text":
            data = synthetic_text.SyntheticTextConfig(
                name=f"depth{config.max_depth}-n{config.num_train_examples}-s{config.data_seed}",
                max_depth=config.max_depth,
                num_train=config.num_train_examples,
                num_test=config.num_eval_examples,
                seed=config.data_seed,
            )
            sources = build("synthetic_text", d, data).as_data_source()
            train_texts = [ex["text"] for ex in head(sources["train"])]
            if config.tokens not in ("char", "word"):
                raise ConfigError("tokens", f"{config.tokens!r} is unknown ('char' or 'word')")
            self.tokenizer = (CharTokenizer if config.tokens == "char" else WordTokenizer).fit(train_texts)
            encode = lambda ex: _shift(self.tokenizer.encode(ex["text"], bos=True, eos=True), n)
            train, test = Mapped(sources["train"], encode), Mapped(sources["test"], encode)
        elif config.dataset == "tiny_shakespeare":
            windows, self.tokenizer = datasets.char_lm("tiny_shakespeare", "train", n, data_dir=d)
            test_windows, _ = datasets.char_lm("tiny_shakespeare", "test", n, data_dir=d)
            train, test = windows, _Weighted(test_windows)
            train = _Weighted(windows)
        elif config.dataset == "text":
            windows, test_windows, self.tokenizer = text_files.read(
                config.text_files,
                n,
                eval_files=config.eval_files,
                eval_fraction=config.eval_fraction,
                tokens="char" if config.tokens == "word" else config.tokens,  # word: lm's synthetic_text default
                cache_dir=os.path.join(d, "seqjax"),
            )
            train, test = _Weighted(windows), _Weighted(test_windows)
        else:
            source, self.tokenizer = datasets.subword_lm("lm1b", "train", config.vocab_size, n + 1, data_dir=d)
            test_source, _ = datasets.subword_lm("lm1b", "test", config.vocab_size, n + 1, data_dir=d)
            split = lambda ex: _shift(ex["tokens"], n)
            train, test = Mapped(source, split), Mapped(test_source, split)
        self.pipeline = Pipeline(train, config.batch_size, seed=config.seed, collate=stack, prefetch=2)
        self.test = stack(head(test, config.num_eval_examples))

    def init(self, rng):
        return jax.jit(self.model.init)(rng, jnp.zeros((1, self.config.seq_len), jnp.int32))["params"], {}

    # -- subclasses ----------------------------------------------------------------------------------------------
    def _logits(self, params, tokens, rng=None):
        raise NotImplementedError

    def _sample(self, params, num, rng) -> np.ndarray:
        raise NotImplementedError

    # -- the task ------------------------------------------------------------------------------------------------
    def _loss(self, params, batch, rng=None):
        logits = self._logits(params, batch["inputs"], rng)
        # Means: summed over devices and eval batches before dividing by the real tokens (seqjax.training.metrics).
        return cross_entropy(logits, batch["targets"], weights=batch["weights"], as_mean=True)

    def loss_fn(self, params, model_state, batch, rng):
        loss, aux = self._loss(params, batch, rng)
        return loss, ({"accuracy": aux["accuracy"]}, model_state)

    def metric_fn(self, params, model_state, batch):
        loss, aux = self._loss(params, batch)
        return {"loss": loss, "perplexity": loss.then(jnp.exp), "accuracy": aux["accuracy"]}

    def report(self, params, model_state, workdir):
        tokens = self._sample(params, self.config.num_samples, jax.random.key(self.config.seed + 1))
        texts = [self.tokenizer.decode(t) for t in np.asarray(tokens)]
        out = {}
        if self.config.dataset == "synthetic_text":
            ok = [synthetic_text.parses(t) for t in texts]
            out["grammaticality"] = float(np.mean(ok))
            out["distinct_samples"] = len(set(texts)) / len(texts)
        if workdir is not None:
            with open(os.path.join(workdir, "samples.txt"), "w") as f:
                for i, t in enumerate(texts[:50]):
                    mark = "" if "grammaticality" not in out else ("ok   " if ok[i] else "BAD  ")
                    f.write(f"{mark}{t}\n")
        return out


def _shift(ids: np.ndarray, n: int) -> dict:
    full = pad([ids], n + 1)[0]
    return {"inputs": full[:-1], "targets": full[1:], "weights": (full[1:] != PAD).astype(np.float32)}


class _Weighted:
    """Windows with all-ones weights."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        ex = self.windows[i]
        return {**ex, "weights": np.ones(len(ex["targets"]), np.float32)}


def sample_prompt(num: int) -> jax.Array:
    return jnp.full((num, 1), BOS, jnp.int32)


def sample(step, state, num, rng, config) -> np.ndarray:
    out = decoding.sample(
        step, state, sample_prompt(num), rng, config.seq_len, temperature=config.sample_temperature, eos_id=EOS
    )
    return np.asarray(out)
