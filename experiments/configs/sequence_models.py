"""sequence_models, CPU default: seven one-step predictors on an AR(12) series with long memory.

Variant `:accelerator`: longer series, wider models, more data.
"""

import ml_collections

from experiments.common import base_config


def get_config(variant: str = "cpu"):
    c = base_config(
        batch_size=64,
        num_train_steps=1500,
        learning_rate=3e-3,
        warmup_steps=50,
        eval_every_steps=500,
        checkpoint_every_steps=500,
        grad_clip_norm=0.0,
    )
    # x_t = 0.3 x_{t-1} + 0.6 x_{t-12} + noise: the lag that matters is beyond the fixed window.
    c.ar_coefficients = (0.3,) + (0.0,) * 10 + (0.6,)
    c.noise_std = 1.0
    c.length = 64
    c.num_train_examples = 8192
    c.num_eval_examples = 1024
    c.eval_batch_size = 256
    c.data_seed = 0
    # make_models' arguments: every model's width, and the autoregressive model's fixed window (the task adds the
    # naive model's max_len = length).
    c.model = ml_collections.ConfigDict(dict(hidden=32, tau=4))
    c.score_from = 16  # one-step errors count from this step (every model has seen 16 values)
    c.forecast_from = 48  # k-step forecasts start after this prefix
    c.horizon = 8
    if variant == "accelerator":
        c.update(
            dict(
                length=256,
                model=dict(hidden=256),
                num_train_examples=200_000,
                batch_size=512,
                num_train_steps=20_000,
                forecast_from=200,
                horizon=32,
            )
        )
    elif variant != "cpu":
        raise ValueError(f"unknown sequence_models config variant {variant!r}; use cpu or accelerator")
    return c
