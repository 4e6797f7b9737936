"""The README's main job: it trains, writes its files, and resumes exactly."""

import json
import shutil

import jax
import pytest

from experiments import attention_demo
from experiments.configs.attention_demo import get_config


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's Adam mixes its int32 step count with Python floats, which strict promotion rejects; our own layers
    # stay covered by the strict setting in their own tests.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _config(**overrides):
    c = get_config()
    c.update(
        dict(
            num_train_steps=40,
            log_every_steps=10,
            checkpoint_every_steps=20,
            batch_size=16,
            length=6,
            emb_dim=16,
            num_heads=2,
            eval_batch_size=32,
        )
    )
    c.update(overrides)
    return c


def _losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["train_loss"] for r in rows}  # the last line for a step wins


def test_demo_writes_metrics_checkpoints_and_pictures(tmp_path):
    summary = attention_demo.train(_config(), str(tmp_path))
    assert summary["step"] == 40 and 0.0 <= summary["eval_accuracy"] <= 1.0
    for name in ("metrics.jsonl", "summary.json", "attention.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert sorted(_losses(tmp_path)) == [10, 20, 30, 40]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]


def test_demo_resumes_exactly(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    attention_demo.train(_config(), str(full))
    # Simulate a crash after step 20: drop the later checkpoint and log lines, then rerun the same command.
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "40")
    (cut / "metrics.jsonl").write_text(
        "".join(line for line in open(full / "metrics.jsonl") if json.loads(line)["step"] <= 20)
    )
    attention_demo.train(_config(), str(cut))
    assert _losses(cut) == _losses(full)  # bitwise: same floats after the resume


def test_demo_rejects_heads_that_do_not_divide_the_width(tmp_path):
    with pytest.raises(ValueError, match="num_heads"):
        attention_demo.train(_config(num_heads=3), str(tmp_path))
