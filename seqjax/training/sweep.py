"""Old home of the sweep names, now `seqjax.sweeps` (kept because the public API named it)."""

from seqjax.sweeps import *  # noqa: F403
