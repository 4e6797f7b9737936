"""vit: a Vision Transformer classifies `captioned_shapes` (default: which of 10 digits and 3 shapes, whatever the
colour, size, position and rotation), `mnist`, `fashion_mnist` or `cifar10`.

    python -m experiments.vit --workdir runs/vit [--config.dataset=mnist]

summary.json: test accuracy. rollout.png: eight test images above the class token's attention rollout over the
patches (Abnar & Zuidema 2020), titled with the true and predicted class. The trained classifier is what the
`dalle` experiment uses to read its generated images (`--config.classifier_workdir`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import PipelineTask, dropout_kwargs, run
from seqjax.data.pipeline import Mapped, Pipeline, stack
from seqjax.data.sources import head, image_sources, images_to_float
from seqjax.models.vit import ViT, attention_rollout, vit_config
from seqjax.plotting import attention_weights, plot_rollout
from seqjax.training import cross_entropy


class ViTTask(PipelineTask):
    def __init__(self, config):
        self.config = config
        train, test, self.names, self.shape = image_sources(config)
        keep = lambda ex: {"image": ex["image"], "label": ex["label"]}
        self.pipeline = Pipeline(Mapped(train, keep), config.batch_size, seed=config.seed, collate=stack, prefetch=2)
        self.test = stack([keep(e) for e in head(test, config.num_eval_examples)])
        self.model = ViT(vit_config(**config.model, num_classes=len(self.names), image_size=self.shape[0]))

    def init(self, rng):
        return jax.jit(self.model.init)(rng, jnp.zeros((1, *self.shape)))["params"], {}

    def _loss(self, params, batch, rng=None):
        logits = self.model.apply({"params": params}, images_to_float(batch["image"]), **dropout_kwargs(rng))
        smoothing = self.config.label_smoothing if rng is not None else 0.0
        return cross_entropy(logits, batch["label"], label_smoothing=smoothing, as_mean=True)

    def loss_fn(self, params, model_state, batch, rng):
        loss, aux = self._loss(params, batch, rng)
        return loss, ({"accuracy": aux["accuracy"]}, model_state)

    def metric_fn(self, params, model_state, batch):
        loss, aux = self._loss(params, batch)
        return {"loss": loss, "accuracy": aux["accuracy"]}

    def report(self, params, model_state, workdir):
        predict = jax.jit(lambda p, x: jnp.argmax(self.model.apply({"params": p}, images_to_float(x)), -1))
        batches = self.eval_batches()
        predictions = np.concatenate([np.asarray(predict(params, b["image"])) for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        if workdir is not None:
            self._rollout(params, predictions[:8], workdir)
        return {"test_accuracy": float(np.mean(predictions == labels)), "test_examples": len(labels)}

    def _rollout(self, params, predictions, workdir):
        images = self.test["image"][:8]
        weights = attention_weights(self.model, {"params": params}, images_to_float(images))
        layers = [weights[k] for k in sorted(weights, key=_layer_index)]
        rollout = np.asarray(attention_rollout(layers))
        grid = self.shape[0] // self.model.config.patch_size
        start = 1 if self.model.config.pool == "cls" else 0
        row = rollout[:, 0, start:] if start else rollout.mean(1)
        maps = row.reshape(len(images), grid, grid)
        titles = [
            f"{self.names[t]} → {self.names[p]}" for t, p in zip(self.test["label"][:8], predictions, strict=True)
        ]
        plot_rollout(np.asarray(images, np.float32) / 255.0, maps, os.path.join(workdir, "rollout.png"), titles=titles)


def _layer_index(path: str) -> int:
    return int(path.split("layers_")[1].split("/")[0])


TASK, CONFIG = ViTTask, "vit.py"  # what experiments.sweep runs


def main():
    run(TASK, CONFIG)


if __name__ == "__main__":
    main()
