"""lm: a decoder-only Transformer language model on `synthetic_text` (default, characters), `tiny_shakespeare`
(characters) or `lm1b` (SentencePiece subwords).

    python -m experiments.lm --workdir runs/lm [--config.dataset=tiny_shakespeare]

summary.json: eval perplexity and token accuracy; for synthetic_text the grammaticality of 256 samples drawn with
the KV cache (the share the grammar's parser accepts) and the share of distinct samples. samples.txt holds 50 of
them (marked ok / BAD on synthetic_text); curves.png the losses.
"""

from __future__ import annotations

from experiments.common import dropout_kwargs, run
from experiments.text_lm import TextLMTask, sample
from seqjax.models import DecoderLM, LMStep, TransformerConfig, lm_state


class LMTask(TextLMTask):
    def __init__(self, config):
        super().__init__(config)
        vocab_size, max_len = self.tokenizer.vocab_size, config.seq_len + 1
        self.model = DecoderLM(TransformerConfig(**config.model, vocab_size=vocab_size, max_len=max_len))

    def _logits(self, params, tokens, rng=None):
        return self.model.apply({"params": params}, tokens, **dropout_kwargs(rng))

    def _sample(self, params, num, rng):
        state = lm_state(self.model, params, num, self.config.seq_len + 1)
        return sample(LMStep(self.model), state, num, rng, self.config)


TASK, CONFIG = LMTask, "lm.py"  # what experiments.sweep runs


def main():
    run(TASK, CONFIG)


if __name__ == "__main__":
    main()
