"""An experiment's model is built from its config's `model` section (`Config(**config.model, <data fields>)`), so
`--config.model.KEY=VALUE` on the command line reaches the model, and the flat keys of before fail naming the new
one."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(num_train_examples=16, num_eval_examples=8, batch_size=8, eval_batch_size=8)
# Parses the command line as `python -m experiments.NAME` does, builds the task and prints its stacks' layer counts.
BUILD = """
import json, sys
import jax
from absl import flags
from seqjax.models.transformer import unstack_layers
from experiments import common, {name} as experiment
common.parse_command_line(experiment.CONFIG, sys.argv)
params, _ = experiment.TASK(flags.FLAGS.config).init(jax.random.key(0))

def stacks(tree, path=""):  # {{path of a layer stack: its layers}}
    layers = sum(k.startswith("layers_") for k in tree)
    out = {{path: layers}} if layers else {{}}
    for k, v in tree.items():
        if isinstance(v, dict) and not k.startswith("layers_"):
            out.update(stacks(v, f"{{path}}/{{k}}"))
    return out
print(json.dumps(stacks(unstack_layers(jax.tree.map(lambda x: x, params)))))
"""


def _layers(name, tmp_path, *args):
    fields = {**TINY, "data_dir": tmp_path / "data"}
    argv = [f"--workdir={tmp_path / 'run'}", *(f"--config.{k}={v}" for k, v in fields.items()), *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", BUILD.format(name=name), *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("name", "default"), [("seq2seq", 2), ("lm", 2)])
def test_a_model_key_on_the_command_line_changes_the_built_model(tmp_path, name, default):
    small = ["--config.model.emb_dim=16", "--config.model.mlp_dim=32"]
    outs = {n: _layers(name, tmp_path, *small, *([f"--config.model.num_layers={n}"] if n else [])) for n in (0, 3)}
    for out in outs.values():
        assert out.returncode == 0, out.stderr[-3000:]
    counts = {n: json.loads(out.stdout.strip().splitlines()[-1]) for n, out in outs.items()}
    stacks = ["/decoder/stack", "/encoder/stack"] if name == "seq2seq" else ["/stack"]
    assert counts == {0: dict.fromkeys(stacks, default), 3: dict.fromkeys(stacks, 3)}


@pytest.mark.slow_beyond(2)
@pytest.mark.parametrize(
    ("name", "key", "new"),
    [("seq2seq", "num_layers", "model.num_layers"), ("lm", "dropout_rate", "model.dropout_rate"),
     ("rnn_lm", "cell", "model.cell"), ("vit", "variant", "model.variant"), ("vqvae", "num_codes", "model.num_codes"),
     ("sequence_models", "hidden", "model.hidden"), ("dalle", "emb_dim", "model.emb_dim"),
     ("dalle", "vqvae.num_codes", "vqvae.model.num_codes")],
)  # fmt: skip
def test_an_old_flat_model_key_fails_naming_the_new_one(tmp_path, name, key, new):
    out = subprocess.run(
        [sys.executable, "-m", f"experiments.{name}", f"--workdir={tmp_path / 'run'}", f"--config.{key}=4"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "SEQJAX_HUGEPAGES": "0"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: config.{key}: no such key (moved to config.{new})"
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


VARIANTS = {
    "seq2seq": ["cpu", "translation", "accelerator"],
    "lm": ["cpu", "tiny_shakespeare", "lm1b", "accelerator"],
    "rnn_lm": ["cpu", "tiny_shakespeare", "accelerator"],
    "vit": ["cpu", "mnist", "cifar10", "accelerator"],
    "vqvae": ["cpu", "accelerator"],
    "sequence_models": ["cpu", "accelerator"],
    "dalle": ["cpu", "accelerator"],
}


def _build(name, model):
    """The model config (or models) `name`'s task builds from the section `model`, with stand-ins for the data."""
    from experiments.sequence_models import make_models
    from seqjax.models import ImageDecoderConfig, RecurrentLMConfig, TransformerConfig, VQVAEConfig, vit_config

    return {
        "seq2seq": lambda: TransformerConfig(**model, vocab_size=12, max_len=13),
        "lm": lambda: TransformerConfig(**model, vocab_size=12, max_len=13),
        "rnn_lm": lambda: RecurrentLMConfig(**model, vocab_size=12),
        "vit": lambda: vit_config(**model, num_classes=13, image_size=28 if model.variant.endswith("/7") else 32),
        "vqvae": lambda: VQVAEConfig(**model, image_channels=3),
        "sequence_models": lambda: make_models(64, **model),
        "dalle": lambda: ImageDecoderConfig(**model, text_vocab_size=40, image_vocab_size=64, image_grid=(8, 8)),
    }[name]()


@pytest.mark.parametrize(("name", "variant"), [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_every_model_section_builds_its_model_config(name, variant):
    import importlib

    import ml_collections

    config = importlib.import_module(f"experiments.configs.{name}").get_config(variant)
    assert isinstance(config.model, ml_collections.ConfigDict)
    built = _build(name, config.model)
    for key, value in config.model.items():  # every key is a field the model config holds, with the section's value
        if not (name == "vit" and key == "variant") and name != "sequence_models":
            assert getattr(built, key) == value, key
    if name == "dalle":  # its stages' sections merge into their own experiments' configs
        vqvae = importlib.import_module("experiments.configs.vqvae").get_config()
        vqvae.update(dict(config.vqvae))
        _build("vqvae", vqvae.model)
        vit = importlib.import_module("experiments.configs.vit").get_config()
        vit.update(dict(config.classifier))
        _build("vit", vit.model)
