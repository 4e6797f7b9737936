"""vqvae: the discrete image tokenizer (a vector-quantised autoencoder, EMA codebook) on `captioned_shapes`
(default), mnist, fashion_mnist or cifar10. Its codes are the image tokens of the `dalle` experiment.

    python -m experiments.vqvae --workdir runs/vqvae

summary.json: test reconstruction MSE, codebook perplexity (effective number of codes used) and usage.
reconstructions.png: test images above their reconstructions through the codes.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import PipelineTask, run
from seqjax.data.pipeline import Mapped, Pipeline, stack
from seqjax.data.sources import head, image_sources, images_to_float
from seqjax.models.vqvae import VQVAE, VQVAEConfig
from seqjax.plotting import plot_image_grid


class VQVAETask(PipelineTask):
    def __init__(self, config):
        self.config = config
        train, test, _, self.shape = image_sources(config)
        keep = lambda ex: {"image": ex["image"]}
        self.pipeline = Pipeline(Mapped(train, keep), config.batch_size, seed=config.seed, collate=stack, prefetch=2)
        self.test = stack([keep(e) for e in head(test, config.num_eval_examples)])
        self.model = VQVAE(VQVAEConfig(**config.model, image_channels=self.shape[-1]))

    def init(self, rng):
        variables = jax.jit(self.model.init)(rng, jnp.zeros((1, *self.shape)))
        return variables["params"], {"vq": variables["vq"]}

    def loss_fn(self, params, model_state, batch, rng):
        (_, aux), new = self.model.apply(
            {"params": params, **model_state}, images_to_float(batch["image"]), True, mutable=["vq"], rngs={"vq": rng}
        )
        metrics = {k: aux[k] for k in ("reconstruction_loss", "perplexity", "usage")}
        return aux["loss"], (metrics, {"vq": new["vq"]})

    def metric_fn(self, params, model_state, batch):
        _, aux = self.model.apply({"params": params, **model_state}, images_to_float(batch["image"]))
        return {"loss": aux["reconstruction_loss"], "perplexity": aux["perplexity"], "usage": aux["usage"]}

    def report(self, params, model_state, workdir):
        if workdir is not None:
            model = self.model.config
            images = images_to_float(self.test["image"][:10])
            recon, _ = self.model.apply({"params": params, **model_state}, images)
            plot_image_grid(
                [np.asarray(images), np.clip(np.asarray(recon), 0, 1)],
                os.path.join(workdir, "reconstructions.png"),
                row_titles=["original", "reconstruction"],
                title=f"VQ-VAE: {model.num_codes} codes, {self.shape[0] // 2**model.num_downsamples}² tokens per image",
            )
        return {}


TASK, CONFIG = VQVAETask, "vqvae.py"  # what experiments.sweep runs


def main():
    run(TASK, CONFIG)


if __name__ == "__main__":
    main()
