"""What the offline builders share: a `GeneratorBasedBuilder` whose configs carry a seed and split sizes, that
writes ArrayRecord files (read back with `tfds.data_source`, no TensorFlow anywhere), and `build()`."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds


@dataclasses.dataclass(eq=False)
class SeededConfig(tfds.core.BuilderConfig):
    """A builder config with a seed and the number of examples per split."""

    seed: int = 0
    num_train: int = 10_000
    num_test: int = 1_000


class SeededBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Examples are a pure function of `(config, split, index)`: `_example(rng, index)` draws example `index` of a
    split from its own generator, seeded from (config seed, split, index), so builds are reproducible bit for bit
    and any example can be regenerated alone."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012 (tfds reads a class attribute)
    DESCRIPTION = ""

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _example(self, rng: np.random.Generator, index: int) -> dict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` looks for metadata files in a per-dataset folder.
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=self._features())

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        count = cfg.num_train if split == "train" else cfg.num_test
        for index in range(count):
            rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, index])
            yield index, self._example(rng, index)

    def example(self, split: str, index: int) -> dict:
        """Example `index` of `split`, regenerated without the files (the test of determinism uses it)."""
        rng = np.random.default_rng([self.builder_config.seed, 0 if split == "train" else 1, index])
        return self._example(rng, index)


def build(name: str, data_dir: str, config: tfds.core.BuilderConfig | str | None = None) -> tfds.core.DatasetBuilder:
    """`tfds.builder(name, config=..., data_dir=...)` prepared (offline, ArrayRecord files) and returned."""
    from seqjax.data import hide_accelerators_from_tensorflow

    hide_accelerators_from_tensorflow()
    tfds.disable_progress_bar()  # one line per build instead of redrawn bars in logs
    kwargs = {} if config is None else {"config": config}
    builder = tfds.builder(name, data_dir=os.fspath(data_dir), file_format="array_record", **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=True))
    return builder
