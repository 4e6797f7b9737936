"""vqvae, CPU default: 64 codes of dimension 16, 32x32 images -> 8x8 tokens, on captioned_shapes.

Variant `:accelerator`: 512 codes on cifar10.
"""

import ml_collections

from experiments.common import base_config


def get_config(variant: str = "cpu"):
    c = base_config(
        batch_size=64,
        num_train_steps=1000,
        learning_rate=2e-3,
        warmup_steps=50,
        eval_every_steps=250,
        checkpoint_every_steps=250,
    )
    c.dataset = "captioned_shapes"  # captioned_shapes | mnist | fashion_mnist | cifar10
    c.num_train_examples = 20_000
    c.num_eval_examples = 512
    c.eval_batch_size = 256
    c.data_seed = 0
    # VQVAEConfig's fields (the task adds image_channels, from the data). res_blocks: residual blocks at the latent
    # grid, encoder and decoder (0: runs from before they existed).
    c.model = ml_collections.ConfigDict(dict(num_codes=64, code_dim=16, channels=64, num_downsamples=2, res_blocks=2))
    if variant == "accelerator":
        c.update(
            dict(
                dataset="cifar10",
                model=dict(num_codes=512, code_dim=64, channels=256),
                batch_size=256,
                num_train_steps=50_000,
                num_eval_examples=10_000,
                parallel="jit",
            )
        )
    elif variant != "cpu":
        raise ValueError(f"unknown vqvae config variant {variant!r}; use cpu or accelerator")
    return c
