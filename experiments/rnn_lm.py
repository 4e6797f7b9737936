"""rnn_lm: a recurrent character language model, `--config.model.cell=lstm|gru|rnn`, on `synthetic_text` (default) or
`tiny_shakespeare`.

    python -m experiments.rnn_lm --workdir runs/rnn_lm [--config.model.cell=gru]

summary.json: eval perplexity and accuracy; for synthetic_text the grammaticality of 256 samples and the share of
distinct ones. samples.txt, curves.png.
"""

from __future__ import annotations

from experiments.common import dropout_kwargs, run
from experiments.text_lm import TextLMTask, sample
from seqjax.models.recurrent_lm import RecurrentLM, RecurrentLMConfig, RNNStep, rnn_state


class RNNLMTask(TextLMTask):
    def __init__(self, config):
        super().__init__(config)
        self.model = RecurrentLM(RecurrentLMConfig(**config.model, vocab_size=self.tokenizer.vocab_size))

    def _logits(self, params, tokens, rng=None):
        logits, _ = self.model.apply({"params": params}, tokens, **dropout_kwargs(rng))
        return logits

    def _sample(self, params, num, rng):
        return sample(RNNStep(self.model), rnn_state(self.model, params, num), num, rng, self.config)


TASK, CONFIG = RNNLMTask, "rnn_lm.py"  # what experiments.sweep runs


def main():
    run(TASK, CONFIG)


if __name__ == "__main__":
    main()
