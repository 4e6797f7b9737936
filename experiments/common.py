"""What every experiment entry point shares: the command line, the shared config fields, and a task base that reads
batches through `seqjax.data.Pipeline` (the data helpers they share are in `seqjax.data.sources`).

An experiment module defines a task class (see `seqjax.training.loop`), `TASK` (that class), `CONFIG` (its default
config file, in experiments/configs) and a `main()` that calls `run(TASK, CONFIG)`; `python -m experiments.NAME
--workdir DIR [--config FILE] [--config.key=value ...]` then trains it with `seqjax.training.train_and_evaluate`,
resuming from DIR when it holds a checkpoint. `experiments.sweep` finds TASK and CONFIG by name.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from typing import Any, NoReturn

import ml_collections
import numpy as np
from ml_collections import config_dict

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def base_config(**fields: Any) -> ml_collections.ConfigDict:
    """The shared fields with CPU-friendly defaults, updated with `fields`."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameters, dropout and data order
    c.batch_size = 64  # global, split over devices and processes
    c.num_train_steps = 1000
    c.log_every_steps = 50  # metrics.jsonl, TensorBoard and the console
    c.eval_every_steps = 250  # 0: only at the end
    c.checkpoint_every_steps = 250  # Orbax; a final one is always written
    c.max_checkpoints_to_keep = config_dict.placeholder(int)  # None: Checkpointer's default
    c.learning_rate = 1e-3
    c.optimizer = "adamw"
    c.schedule = "cosine"
    c.warmup_steps = 50
    c.weight_decay = 0.0
    c.grad_clip_norm = 1.0
    c.grad_accum_steps = config_dict.placeholder(int)  # K micro-batches per step, summed; None: make_train_step's (1)
    c.ema_decay = config_dict.placeholder(float)  # EMA of the parameters, evaluated beside them; None: off
    c.parallel = "none"  # "none" | "pmap" | "jit"
    c.data_dir = ""  # TFDS data directory; "": TFDS's default (~/tensorflow_datasets)
    c.update(fields)
    return c


def eval_chunks(test: dict, n: int) -> list[dict]:
    """A held-out batch dict cut into whole batches of `n` rows (a remainder is left out)."""
    count = len(next(iter(test.values())))
    return [{k: v[i : i + n] for k, v in test.items()} for i in range(0, count - n + 1, n)]


def dropout_kwargs(rng: Any) -> dict:
    """`apply` keywords: training with dropout from `rng`, or deterministic evaluation when `rng` is None."""
    return {"deterministic": rng is None, "rngs": None if rng is None else {"dropout": rng}}


class PipelineTask:
    """A task whose training batches come from `self.pipeline` (a `seqjax.data.Pipeline`, prefetching) and whose
    held-out examples are `self.test` (a batch dict), evaluated in batches of `config.eval_batch_size`."""

    pipeline: Any
    test: dict
    config: Any

    def eval_batches(self) -> list[dict]:
        return eval_chunks(self.test, self.config.eval_batch_size)

    def train_batch(self, index: int) -> dict:
        if self.pipeline.process_count == 1:
            return self.pipeline(index)  # through the read-ahead thread
        return self.pipeline.batch(index)

    def process_batch(self, index: int) -> dict:
        return self.pipeline.process_batch(index)


def run(task_cls: type, default_config: str) -> None:
    """Parses the command line (flags are defined here, once, when run as a program) and trains.

    A mistake in the command line or the config (an unknown key, a value of the wrong type or out of range, a batch
    the devices cannot split, a dataset missing from data_dir, a workdir that cannot be written or that another run
    holds) ends the program before anything compiles with one line on stderr, `error: config.KEY: what is wrong
    (what is allowed)`, and exit status 2; other errors keep their traceback."""
    from absl import app

    from seqjax import runtime

    # CPU hosts only: XLA's per-step buffers get huge pages (a fifth to a quarter of a step was page faults;
    # BENCHMARKS.md). It restarts this command once, with GLIBC_TUNABLES set; SEQJAX_HUGEPAGES=0 opts out.
    runtime.restart_with_hugepages_on_cpu()
    argv = parse_command_line(default_config, sys.argv)
    app.run(lambda _: _train(task_cls), argv=argv, flags_parser=lambda _: argv)


def _train(task_cls: type) -> None:
    from absl import flags, logging

    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from seqjax.errors import ConfigError
    from seqjax.runtime import hugepage_status
    from seqjax.training import train_and_evaluate

    print(f"seqjax: {hugepage_status()}", file=sys.stderr)
    config, workdir = flags.FLAGS.config, os.path.abspath(flags.FLAGS.workdir)
    if "workdir" in inspect.signature(task_cls).parameters:  # tasks that train stages of their own in the workdir
        build = lambda: task_cls(config, workdir=workdir)
    else:
        build = lambda: task_cls(config)
    try:
        # The loop checks the config, starts JAX's distributed runtime and locks the workdir, then builds the task.
        summary = train_and_evaluate(config, workdir, build)
    except ConfigError as e:
        exit_with_error(e)
    print(json.dumps(_jsonable(summary), indent=2))


def exit_with_error(error: Any) -> NoReturn:
    """Prints `error: MESSAGE` (one line) to stderr and exits with status 2: for a mistake in the command line or
    the config, which a traceback would only bury."""
    print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_command_line(default_config: str, argv: list[str]) -> list[str]:
    """Defines --workdir and --config (an ml_collections config file, `--config.KEY=VALUE` overrides) and parses
    `argv` into them, returning the arguments left; a mistake exits through `exit_with_error`."""
    from absl import app, flags
    from ml_collections import config_flags

    from seqjax.errors import ConfigError

    app.define_help_flags()  # --help, as app.run would define them
    try:
        help_text = "where checkpoints, metrics and pictures go (reruns resume)"
        flags.DEFINE_string("workdir", None, help_text, required=True)
        config_file = os.path.join(CONFIGS, default_config)  # a name in experiments/configs, or an absolute path
        # The default config file (with the overrides of argv) is read here, the one of --config when parsing.
        config_flags.DEFINE_config_file("config", config_file, "experiment config")
        rest = flags.FLAGS(argv)
        flags.FLAGS.config.keys()  # a config file that cannot be read raises at its first use
        return rest
    except OSError as e:
        exit_with_error(f"--config: {str(e).strip().splitlines()[-1].strip()} (a config file, FILE or FILE:VARIANT)")
    except (flags.Error, ConfigError) as e:
        exit_with_error(_flag_error(e))
    except (KeyError, AttributeError) as e:  # ml_collections: an override of a key the config does not have
        message = _unknown_key(e, argv, _config_file(default_config, argv))
        if message is None:
            raise
        exit_with_error(message)


def _flag_error(error: Exception) -> str:
    """absl's message for a flag it could not parse, as `NAME: what is wrong (what is allowed)`."""
    raw = str(error).strip()
    if "Traceback (most recent call last)" in raw:  # ml_collections: the config file raised; its last line says why
        why = re.sub(r"^[\w.]+: ", "", raw.splitlines()[-1])  # without the exception's type
        return why if why.startswith("config.") else f"--config: {why}"  # a ConfigError names its key itself
    text = " ".join(raw.split())
    m = re.match(r"flag --([\w.-]+)=(.*?): (.*)$", text)
    if m is None:
        return text
    name, value, why = m.groups()
    if name.startswith("config."):  # an override whose value does not parse as the field's type
        default = _config_value(name.split(".", 1)[1])
        allowed = why if default is None else f"{type(default).__name__}, like {default!r}"
        return f"{name}: {value!r} has the wrong type ({allowed})"
    if value == "None":
        return f"--{name}: missing ({why})"
    return f"--{name}: {why}"


def _config_value(key: str) -> Any:
    """The value of `key` in the config parsed so far (None when there is none)."""
    from absl import flags

    node = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    for part in key.split("."):
        if node is None or not hasattr(node, "keys") or part not in node:
            return None
        node = node[part]
    return node


def _config_file(default_config: str, argv: list[str]) -> Any:
    """The config that `--config FILE[:VARIANT]` in `argv` (or the default config file) names, without overrides;
    None when it cannot be read."""
    from seqjax.sweeps import load_config, split_config

    spec = os.path.join(CONFIGS, default_config)
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    try:
        return load_config(*split_config(spec))
    except Exception:  # the error being reported is the override's, not this one
        return None


def _unknown_key(error: BaseException, argv: list[str], config: Any = None) -> str | None:
    """ml_collections' KeyError / AttributeError for `--config.A.B=...` where the config has no A (or A no B) as
    `config.A: no such key (did you mean ...?)`, or `(moved to config.model.A)` for a key that `config` now holds
    in a section (`seqjax.sweeps.moved_key`: the model's fields moved into `config.model`); None when it is not about
    an override on the command line."""
    from seqjax.sweeps import moved_key

    texts, e = [], error
    while e is not None:  # ml_collections wraps the KeyError that names the key (and its suggestion) twice
        texts.append(str(e.args[0]) if e.args else "")
        e = e.__cause__ or e.__context__
    text = " ".join(texts)
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        parts = arg.split("=", 1)[0][len("--config.") :].split(".")
        if config is not None and _holds(config, parts):
            continue  # a key the config has: not the one reported
        moved = None if config is None else moved_key(config, ".".join(parts))
        for depth, part in enumerate(parts):
            if f"'{part}'" in text:
                if moved:
                    return f"config.{'.'.join(parts[: depth + 1])}: no such key (moved to config.{moved})"
                near = re.search(rf'Did you mean "([\w-]+)" instead of "{re.escape(part)}"', text)
                suggestion = ".".join([*parts[:depth], near.group(1)]) if near else None
                hint = f"did you mean config.{suggestion}?" if near else "not in the config file"
                return f"config.{'.'.join(parts[: depth + 1])}: no such key ({hint})"
    return None


def _holds(config: Any, parts: list[str]) -> bool:
    for part in parts:
        if not hasattr(config, "keys") or part not in config:
            return False
        config = config[part]
    return True


def _jsonable(d: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()}
