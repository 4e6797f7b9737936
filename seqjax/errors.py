"""`ConfigError`: a setting the person running the program must change, named by its key.

Raised by the config checks (`seqjax.training.validate_config`, `Parallel`, the experiments' tasks) and the dataset
loaders. The experiment entry points print it as one line, `error: config.KEY: what is wrong (what is allowed)`, and
exit with status 2; library code may catch it as a `ValueError`.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """`str(e)` is `config.KEY: MESSAGE`; `key` is the dotted config key (`batch_size`, `vqvae.num_codes`)."""

    prefix = "config."

    def __init__(self, key: str, message: str | None = None):
        if message is None:  # re-raised with one text, as ml_collections does for errors in config files
            self.key, self.message = None, key
            super().__init__(key)
            return
        self.key, self.message = key, message
        super().__init__(f"{self.prefix}{key}: {message}")

    def __reduce__(self):  # picklable through multiprocessing, with both arguments
        return type(self), (self.key, self.message)


__all__ = ["ConfigError"]
