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

from experiments._common import PipelineTask, data_dir, dropout_kwargs, head, run
from seqjax.data import datasets
from seqjax.data.builders import build, captioned_shapes
from seqjax.data.pipeline import Mapped, Pipeline, stack
from seqjax.errors import ConfigError
from seqjax.models.vit import ViT, attention_rollout, vit_config
from seqjax.plotting import attention_weights, plot_rollout
from seqjax.training import cross_entropy

DATASETS = ("captioned_shapes", *datasets.IMAGE_DATASETS)
CAPTIONED_SHAPES_TEST = 2000


def image_sources(config):
    """(train, test, class names, image shape) for `config.dataset`; examples {"image" uint8, "label" int32}."""
    if config.dataset not in DATASETS:
        raise ConfigError("dataset", f"{config.dataset!r} is unknown (one of {', '.join(DATASETS)})")
    if config.dataset == "captioned_shapes":
        sources = captioned_shapes_sources(config)
        pick = lambda ex: {"image": ex["image"], "label": np.int32(ex["shape"])}
        train, test = Mapped(sources["train"], pick), Mapped(sources["test"], pick)
        names, shape = list(captioned_shapes.SHAPES), (32, 32, 3)
    else:
        train, names = datasets.image_classes(config.dataset, "train", data_dir=data_dir(config))
        test, _ = datasets.image_classes(config.dataset, "test", data_dir=data_dir(config))
        shape = (32, 32, 3) if config.dataset == "cifar10" else (28, 28, 1)
    return train, test, names, shape


def captioned_shapes_sources(config) -> dict:
    """The captioned_shapes splits every image experiment shares: `num_train_examples` training images and a fixed
    test split of 2000 (experiments evaluate on its first `num_eval_examples`), from `data_seed`."""
    data = captioned_shapes.CaptionedShapesConfig(
        name=f"n{config.num_train_examples}-s{config.data_seed}",
        num_train=config.num_train_examples,
        num_test=CAPTIONED_SHAPES_TEST,
        seed=config.data_seed,
    )
    return build("captioned_shapes", data_dir(config), data).as_data_source()


def images_to_float(images) -> jax.Array:
    return jnp.asarray(images, jnp.float32) / 255.0


class ViTTask(PipelineTask):
    def __init__(self, config):
        self.config = config
        train, test, self.names, self.shape = image_sources(config)
        keep = lambda ex: {"image": ex["image"], "label": ex["label"]}
        self.pipeline = Pipeline(Mapped(train, keep), config.batch_size, seed=config.seed, collate=stack, prefetch=2)
        self.test = stack([keep(e) for e in head(test, config.num_eval_examples)])
        self.model = ViT(
            vit_config(
                config.variant,
                num_classes=len(self.names),
                image_size=self.shape[0],
                pool=config.pool,
                dropout_rate=config.dropout_rate,
                scan_layers=config.scan_layers,
            )
        )

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
