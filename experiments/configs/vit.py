"""vit, CPU default: ViT-Mu/8 (width 64, 4 layers, 16 patches of 8x8) on captioned_shapes.

Variants: `:mnist`, `:cifar10` (prepared beforehand; see seqjax.data.datasets), `:accelerator` (ViT-S/4 on
cifar10, for a GPU/TPU).
"""

import ml_collections

from experiments.common import base_config


def get_config(variant: str = "cpu"):
    c = base_config(
        batch_size=128,
        num_train_steps=2000,
        learning_rate=2e-3,
        warmup_steps=100,
        eval_every_steps=250,
        checkpoint_every_steps=250,
        weight_decay=0.05,
    )
    c.dataset = "captioned_shapes"  # captioned_shapes | mnist | fashion_mnist | cifar10
    c.num_train_examples = 20_000  # captioned_shapes
    c.num_eval_examples = 1024
    c.eval_batch_size = 256
    c.data_seed = 0
    # vit_config's arguments: `variant` (a seqjax.models.vit.VARIANTS name / patch size; 8x8 patches: 16 tokens) and
    # ViTConfig's fields (the task adds num_classes and image_size, from the data).
    c.model = ml_collections.ConfigDict(
        dict(
            variant="Mu/8",
            pool="cls",
            dropout_rate=0.0,
            attention_dropout_rate=0.0,
            scan_layers=True,
            dtype="float32",  # compute dtype; "bfloat16": mixed precision, parameters stay float32
        )
    )
    c.label_smoothing = 0.0
    if variant in ("mnist", "cifar10"):
        c.dataset = variant
        c.num_eval_examples = 10_000
        c.model.variant = "Mu/7" if variant == "mnist" else "Mu/8"  # 28x28 images: 7x7 patches
    elif variant == "accelerator":
        c.update(
            dict(
                dataset="cifar10",
                model=dict(variant="S/4", dropout_rate=0.1, dtype="bfloat16"),
                batch_size=512,
                num_train_steps=50_000,
                label_smoothing=0.1,
                num_eval_examples=10_000,
                parallel="jit",
            )
        )
    elif variant != "cpu":
        raise ValueError(f"unknown vit config variant {variant!r}; use cpu, mnist, cifar10 or accelerator")
    return c
