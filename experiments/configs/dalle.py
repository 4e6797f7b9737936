"""dalle, CPU default: a 3-layer decoder of width 128 over 12 caption words and 8x8 VQ codes.

The tokenizer and the judge train first with their own configs (`config.vqvae`, `config.classifier`: overrides
of experiments/configs/vqvae.py and vit.py). Variant `:accelerator`: a wider, deeper decoder and more data.
"""

import ml_collections

from experiments.common import base_config


def get_config(variant: str = "cpu"):
    c = base_config(
        batch_size=64,
        num_train_steps=1500,
        learning_rate=2e-3,
        warmup_steps=100,
        eval_every_steps=500,
        checkpoint_every_steps=500,
        weight_decay=0.01,
    )
    c.num_train_examples = 20_000
    c.num_eval_examples = 256  # held-out captions generated for the fidelity
    c.eval_batch_size = 256
    c.data_seed = 0
    # ImageDecoderConfig's fields (the task adds text_vocab_size, image_vocab_size and image_grid, from the data and
    # the tokenizer). text_len: caption words (the longest caption has 10).
    c.model = ml_collections.ConfigDict(
        dict(
            text_len=12,
            emb_dim=128,
            num_heads=4,
            num_layers=3,
            mlp_dim=512,
            dropout_rate=0.0,
            attention_dropout_rate=0.0,
            caption_dropout=0.1,
            scan_layers=True,
            dtype="float32",  # compute dtype; "bfloat16": mixed precision, parameters stay float32
        )
    )
    c.guidance_scale = 3.0
    c.temperature = 0.7  # sharper samples: fidelity 0.51 at 1.0, 0.56 at 0.7, 0.55 at 0.5 (one trained decoder)
    c.top_k = 0  # 0: no top-k filter
    c.vqvae_workdir = ""  # "": train the tokenizer in WORKDIR/vqvae
    c.classifier_workdir = ""  # "": train the judge in WORKDIR/classifier
    # The stages' fields that differ from their own defaults, or that one may want to change from here.
    c.vqvae = ml_collections.ConfigDict(
        dict(
            num_train_steps=1000,
            # res_blocks 0 to reuse a tokenizer trained before residual blocks existed
            model=dict(num_codes=128, code_dim=16, channels=64, res_blocks=2),
            batch_size=64,
            warmup_steps=50,
            eval_batch_size=256,
            num_eval_examples=512,
        )
    )
    c.classifier = ml_collections.ConfigDict(
        dict(
            num_train_steps=1500,
            model=dict(variant="Mu/8"),
            batch_size=128,
            warmup_steps=100,
            eval_batch_size=256,
            num_eval_examples=1024,
        )
    )
    if variant == "accelerator":
        c.update(
            dict(
                model=dict(emb_dim=512, num_heads=8, num_layers=12, mlp_dim=2048, dtype="bfloat16"),
                batch_size=256,
                num_train_steps=50_000,
                num_train_examples=200_000,
                parallel="jit",
            )
        )
        c.vqvae.update(dict(num_train_steps=20_000, model=dict(num_codes=512), batch_size=256))
        c.classifier.update(dict(num_train_steps=10_000, batch_size=512))
    elif variant != "cpu":
        raise ValueError(f"unknown dalle config variant {variant!r}; use cpu or accelerator")
    return c
