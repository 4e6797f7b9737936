"""Offline TFDS builders of our own, registered with TFDS on import:

- `seq_tasks`: copy / reverse / sort / trim / omit / permute / addition transduction tasks;
- `time_series`: noisy sines, mixtures, an AR(p) process with known coefficients;
- `synthetic_text`: sentences of a small probabilistic grammar (samples can be checked for grammaticality);
- `captioned_shapes`: 32x32 images of digits and shapes with captions and labels.

    from seqjax.data.builders import build, seq_tasks
    builder = build("seq_tasks", data_dir, seq_tasks.config("sort", num_train=1000))
    source = builder.as_data_source()["train"]      # or tfds.data_source("seq_tasks/sort", data_dir=...)
"""

from seqjax.data.builders import captioned_shapes, seq_tasks, synthetic_text, time_series
from seqjax.data.builders.seeded import SeededBuilder, SeededConfig, build

__all__ = ["SeededBuilder", "SeededConfig", "build", "captioned_shapes", "seq_tasks", "synthetic_text", "time_series"]
