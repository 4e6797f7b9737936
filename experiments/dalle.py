"""dalle: a DALL-E-style decoder-only Transformer generates images from captions, on `captioned_shapes`.

    python -m experiments.dalle --workdir runs/dalle

Three stages, each its own resumable run under WORKDIR (or reused from `--config.vqvae_workdir` /
`--config.classifier_workdir`):
1. the image tokenizer: the `vqvae` experiment (32x32 images -> 8x8 codes), in WORKDIR/vqvae;
2. the judge: the `vit` experiment's classifier, in WORKDIR/classifier;
3. the decoder: captions (words) then image codes as one stream, trained with cross-entropy (the image tokens
   weighted 7/8, captions dropped 10% of the time for classifier-free guidance).

The training images are tokenized once and cached in WORKDIR/tokens.npz. At the end, one image is sampled for each
of 256 held-out captions (KV cache, guidance), decoded by the tokenizer and read by the classifier: caption fidelity
is the share whose shape (digit, circle, square, triangle) is the one the caption asks for; `digit_fidelity` counts
the digit captions only. generated.png: samples for eight captions (captions under the images);
summary.json: the fidelities, and `reconstruction_fidelity`, the share the classifier reads correctly in the
tokenizer's reconstructions of the real test images (the ceiling any decoder can reach through this tokenizer).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import vit as vit_experiment
from experiments import vqvae as vqvae_experiment
from experiments.common import PipelineTask, run
from experiments.configs import vit as vit_configs
from experiments.configs import vqvae as vqvae_configs
from seqjax import decoding
from seqjax.data.builders import captioned_shapes
from seqjax.data.pipeline import Pipeline, pad, stack
from seqjax.data.sources import captioned_shapes_sources, head, images_to_float
from seqjax.data.tokenizers import WordTokenizer
from seqjax.models.image_decoder import ImageDecoderConfig, ImageStep, ImageTokenDecoder, image_prompt, image_state
from seqjax.plotting import plot_image_grid
from seqjax.training import Checkpointer, TrainState, make_optimizer, train_and_evaluate
from seqjax.training.metrics import Mean


def train_stage(config, workdir: str, task_cls) -> tuple:
    """Runs (or resumes) the experiment `task_cls` in `workdir`, or only reads it back when it has finished there
    (a checkpoint at `num_train_steps` or later and its summary written): a rerun of dalle neither retrains a
    finished stage nor evaluates it again, rewrites its summary or redraws its pictures. Returns the task and its
    trained (params, model_state)."""
    task = task_cls(config)
    if not _finished(config, workdir):
        train_and_evaluate(config, workdir, task)
    params, model_state = task.init(jax.random.key(0))
    template = TrainState.create(params, make_optimizer(config), jax.random.key(0), model_state)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state, _ = ckpt.restore(template)
    finally:
        ckpt.close()
    return task, (state.params, state.model_state)


def _finished(config, workdir: str) -> bool:
    if not os.path.exists(os.path.join(workdir, "summary.json")):
        return False
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return (ckpt.latest_step() or 0) >= config.num_train_steps
    finally:
        ckpt.close()


def _stage_config(base, overrides, parent) -> object:
    c = base.get_config()
    c.update(dict(overrides))
    c.data_dir, c.seed, c.parallel = parent.data_dir, parent.seed, parent.parallel
    c.num_train_examples, c.data_seed = parent.num_train_examples, parent.data_seed
    return c


class DalleTask(PipelineTask):
    def __init__(self, config, workdir: str):
        self.config = config
        with jax.numpy_dtype_promotion("standard"):
            vq_dir = config.vqvae_workdir or os.path.join(workdir, "vqvae")
            self.vq_task, self.vq = train_stage(
                _stage_config(vqvae_configs, config.vqvae, config), vq_dir, vqvae_experiment.VQVAETask
            )
            judge_dir = config.classifier_workdir or os.path.join(workdir, "classifier")
            self.judge_task, self.judge = train_stage(
                _stage_config(vit_configs, config.classifier, config), judge_dir, vit_experiment.ViTTask
            )
        sources = captioned_shapes_sources(config)
        train = head(sources["train"])
        self.tokenizer = WordTokenizer.fit([ex["caption"] for ex in train])
        vq = self.vq_task.model.config
        grid = self.vq_task.shape[0] // 2**vq.num_downsamples
        self.model = ImageTokenDecoder(
            ImageDecoderConfig(
                **config.model,
                text_vocab_size=self.tokenizer.vocab_size,
                image_vocab_size=vq.num_codes,
                image_grid=(grid, grid),
            )
        )
        self.tokens = self._tokenize(train, os.path.join(workdir, "tokens.npz"))
        source = [{"text": t, "image": c} for t, c in zip(self.tokens["text"], self.tokens["image"], strict=True)]
        self.pipeline = Pipeline(source, config.batch_size, seed=config.seed, collate=stack, prefetch=2)
        test = head(sources["test"], config.num_eval_examples)
        self.test_captions = [_text(ex["caption"]) for ex in test]
        self.test_shapes = np.array([int(ex["shape"]) for ex in test])
        self.test_images = images_to_float(np.stack([ex["image"] for ex in test]))

    def _encode_text(self, captions) -> np.ndarray:
        return pad([self.tokenizer.encode(c) for c in captions], self.model.config.text_len)

    def _tokenize(self, examples, path) -> dict[str, np.ndarray]:
        """Captions to character ids and images to VQ codes, once (cached beside the run)."""
        if os.path.exists(path):
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        vq_params, vq_state = self.vq
        encode = jax.jit(
            lambda x: self.vq_task.model.apply({"params": vq_params, **vq_state}, images_to_float(x), method="encode")
        )
        images = np.stack([ex["image"] for ex in examples])
        codes = np.concatenate([np.asarray(encode(images[i : i + 500])) for i in range(0, len(images), 500)])
        tokens = {
            "text": self._encode_text([_text(ex["caption"]) for ex in examples]),
            "image": codes.reshape(len(codes), -1).astype(np.int32),
        }
        tmp = path + ".tmp.npz"
        os.makedirs(os.path.dirname(path), exist_ok=True)  # the stages may live elsewhere (--config.*_workdir)
        np.savez(tmp, **tokens)
        os.replace(tmp, path)
        return tokens

    def init(self, rng):
        text = jnp.zeros((1, self.model.config.text_len), jnp.int32)
        image = jnp.zeros((1, self.model.config.num_image_tokens), jnp.int32)
        return jax.jit(self.model.init)(rng, text, image)["params"], {}

    def _losses(self, params, batch, rng=None):
        """(text, image) cross-entropies as Means, reduced over devices and batches before dividing by their tokens
        (seqjax.training.metrics); the loss is their sum weighted by `image_loss_weight`."""
        kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
        _, aux = self.model.apply(
            {"params": params}, batch["text"], batch["image"], rng is None, method="loss", **kwargs
        )
        text, image = Mean(aux["text_sum"], aux["text_tokens"]), Mean(aux["image_sum"], aux["image_tokens"])
        w = self.model.config.image_loss_weight
        return (text.scaled(1.0 - w), image.scaled(w)), {"text_loss": text, "image_loss": image}

    def loss_fn(self, params, model_state, batch, rng):
        loss, metrics = self._losses(params, batch, rng)
        return loss, (metrics, model_state)

    def eval_batches(self):
        n = self.config.eval_batch_size
        return [{k: v[-n:] for k, v in self.tokens.items()}]  # training examples: a fit check, not a test

    def metric_fn(self, params, model_state, batch):
        loss, metrics = self._losses(params, batch)
        return {"loss": loss, **metrics}  # a pair of Means: its value is their sum

    def generate(self, params, captions, rng) -> np.ndarray:
        """Images [B, H, W, C] in [0, 1] for `captions`."""
        text = jnp.asarray(self._encode_text(captions))
        state = image_state(self.model, params, len(captions), self.config.guidance_scale)
        codes = decoding.sample(
            ImageStep(self.model),
            state,
            image_prompt(self.model, text),
            rng,
            self.model.config.num_image_tokens,
            temperature=self.config.temperature,
            top_k=self.config.top_k or None,
        )
        grid = self.model.config.image_grid
        vq_params, vq_state = self.vq
        images = self.vq_task.model.apply({"params": vq_params, **vq_state}, codes.reshape(-1, *grid), method="decode")
        return np.clip(np.asarray(images), 0.0, 1.0)

    def report(self, params, model_state, workdir):
        rng = jax.random.key(self.config.seed + 7)
        images = np.concatenate(
            [
                self.generate(params, self.test_captions[i : i + 64], jax.random.fold_in(rng, i))
                for i in range(0, len(self.test_captions), 64)
            ]
        )
        judge_params, _ = self.judge
        read = jax.jit(lambda x: jnp.argmax(self.judge_task.model.apply({"params": judge_params}, x), -1))
        seen = np.asarray(read(jnp.asarray(images, jnp.float32)))
        right = seen == self.test_shapes
        digits = self.test_shapes < 10
        # The ceiling: the judge reading the tokenizer's reconstructions of the real images of these captions.
        vq_params, vq_state = self.vq
        recon, _ = self.vq_task.model.apply(
            {"params": vq_params, **vq_state}, jnp.asarray(self.test_images, jnp.float32)
        )
        ceiling = np.asarray(read(jnp.clip(recon, 0.0, 1.0))) == self.test_shapes
        out = {
            "caption_fidelity": float(right.mean()),
            "digit_fidelity": float(right[digits].mean()),
            "fidelity_samples": len(right),
            "reconstruction_fidelity": float(ceiling.mean()),
        }
        if workdir is not None:
            captions = self.test_captions[:8]
            rows = [self.generate(params, captions, jax.random.fold_in(rng, 10_000 + r)) for r in range(3)]
            names = captioned_shapes.SHAPES
            readings = [[f"read: {names[s]}" for s in np.asarray(read(jnp.asarray(row)))] for row in rows]
            plot_image_grid(
                rows,
                os.path.join(workdir, "generated.png"),
                captions=[c.replace(" in the ", "\nin the ") for c in captions],
                labels=readings,
                row_titles=[f"sample {r + 1}" for r in range(3)],
                title=f"Generated from held-out captions (guidance {self.config.guidance_scale}); under each image, "
                "the shape the ViT judge reads",
            )
        return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


TASK, CONFIG = DalleTask, "dalle.py"  # what experiments.sweep runs


def main():
    run(TASK, CONFIG)


if __name__ == "__main__":
    main()
