"""Data: offline TFDS builders of our own (`seqjax.data.builders`), the index-arithmetic input pipeline
(`seqjax.data.pipeline`), real datasets (`seqjax.data.datasets`) and tokenizers (`seqjax.data.tokenizers`).

Nothing here needs TensorFlow: the builders write ArrayRecord files that `tfds.data_source` reads by index. Should
TensorFlow be imported all the same (a feature that needs it, a user's own code), `hide_accelerators_from_tensorflow`
keeps it off the GPUs and TPUs so it never takes accelerator memory; the pipeline calls it before reading. Importing
`seqjax.nn`, `seqjax.models` or `seqjax.training` imports neither TensorFlow nor TFDS.
"""

from __future__ import annotations

import sys


def hide_accelerators_from_tensorflow() -> None:
    """If TensorFlow has been imported, make it see no GPU or TPU (it must be called before TensorFlow's first op;
    later calls are harmless). TensorFlow is never imported here."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # already initialised, or no such device type
            pass


__all__ = ["hide_accelerators_from_tensorflow"]
