"""vit, CPU default: ViT-Mu/8 (width 64, 4 layers, 16 patches of 8x8) on captioned_shapes.

Variants: `:mnist`, `:cifar10` (prepared beforehand; see seqjax.data.datasets), `:accelerator` (ViT-S/4 on
cifar10, for a GPU/TPU).
"""

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
    c.variant = "Mu/8"  # seqjax.models.vit.VARIANTS name / patch size (8x8 patches: 16 tokens)
    c.pool = "cls"
    c.dropout_rate = 0.0
    c.label_smoothing = 0.0
    c.scan_layers = True
    if variant in ("mnist", "cifar10"):
        c.dataset = variant
        c.num_eval_examples = 10_000
        c.variant = "Mu/7" if variant == "mnist" else "Mu/8"  # 28x28 images: 7x7 patches
    elif variant == "accelerator":
        c.update(
            dict(
                dataset="cifar10",
                variant="S/4",
                batch_size=512,
                num_train_steps=50_000,
                dropout_rate=0.1,
                label_smoothing=0.1,
                num_eval_examples=10_000,
                parallel="jit",
            )
        )
    elif variant != "cpu":
        raise ValueError(f"unknown vit config variant {variant!r}; use cpu, mnist, cifar10 or accelerator")
    return c
