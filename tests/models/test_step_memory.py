"""A small decoder LM's training step keeps its temporary memory under glibc's mmap threshold (32 MiB) on CPU.

XLA allocates a compiled program's temporaries as one block per call; glibc maps a block above 32 MiB afresh each
time, and the step then page-faults through all of it (BENCHMARKS.md, "nanoGPT's CPU shape"). At nanoGPT's CPU
quick-start shape the step was 47 MB; the LayerNorm and MLP backward passes and the C++ attention kernel bring it
to about 31 MB.
"""

import jax
import numpy as np
import optax
import pytest

from seqjax.kernels import common, cpu
from seqjax.models import DecoderLM, TransformerConfig

MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu" or not cpu.available(), reason="the C++ CPU kernels' shape")
def test_nanogpt_shape_step_temporaries_fit_under_the_mmap_threshold(monkeypatch):
    monkeypatch.setattr(common, "single_device", lambda: True)  # a user's process (the tests run 8 CPU devices)
    cfg = TransformerConfig(
        vocab_size=65, emb_dim=128, num_heads=4, num_layers=4, mlp_dim=512, max_len=64, dropout_rate=0.0,
        attention_dropout_rate=0.0, position="learned",
    )  # fmt: skip
    model, opt = DecoderLM(cfg), optax.adamw(1e-3)
    x = np.zeros((12, 64), np.int32)
    params = model.init(jax.random.key(0), x)["params"]

    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes its int32 count with floats
        compiled = jax.jit(step).lower(params, opt.init(params), x, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < MMAP_THRESHOLD_MAX
