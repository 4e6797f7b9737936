"""Vectorised sweeps: K configurations stacked and trained with jax.vmap give, per configuration, the losses of K
separate runs; checkpoints and logs per trial; resume; what may not vary is refused with the key's name."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.training import read_metrics, train_and_evaluate
from seqjax.training.checkpoint import Checkpointer
from seqjax.training.vectorized import check_vectorizable, hparam, traced_hparams, train_and_evaluate_many
from tests.training.toy_task import ToyTask, toy_config


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with Python floats
        yield


GRID = [dict(learning_rate=lr, seed=seed) for lr in (1e-3, 1e-2, 3e-2) for seed in (0, 1)]


def _config(**kw):
    return toy_config(
        **{**dict(num_train_steps=12, eval_every_steps=6, checkpoint_every_steps=6, warmup_steps=2), **kw}
    )


def _curve(workdir, key="train_loss"):
    return np.array([r[key] for r in read_metrics(workdir).values() if key in r])


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate")
    out = []
    with jax.numpy_dtype_promotion("standard"):
        for i, overrides in enumerate(GRID):
            config = _config(**overrides)
            train_and_evaluate(config, str(root / f"t{i}"), ToyTask(config))
            out.append(str(root / f"t{i}"))
    return out


@pytest.mark.slow
def test_stacked_trials_match_separate_runs(tmp_path, separate):
    configs = [_config(**o) for o in GRID]
    dirs = [str(tmp_path / f"t{i}") for i in range(len(GRID))]
    summaries = train_and_evaluate_many(configs, dirs, [ToyTask(c) for c in configs])
    for d, ref, summary in zip(dirs, separate, summaries, strict=True):
        np.testing.assert_allclose(_curve(d), _curve(ref), rtol=1e-6)
        np.testing.assert_allclose(_curve(d, "learning_rate"), _curve(ref, "learning_rate"), rtol=1e-6)
        np.testing.assert_allclose(_curve(d, "eval_loss"), _curve(ref, "eval_loss"), rtol=1e-6)
        want = json.load(open(os.path.join(ref, "summary.json")))
        assert summary.keys() == want.keys()
        np.testing.assert_allclose(summary["w1_norm"], want["w1_norm"], rtol=1e-6)
        assert os.path.exists(os.path.join(d, "curves.png")) and os.listdir(os.path.join(d, "tensorboard"))
    # The trials really differ (learning rates and seeds), so the comparison above is not trivially true.
    finals = [_curve(d)[-1] for d in dirs]
    assert len({round(float(f), 6) for f in finals}) == len(GRID)
    # Each trial's checkpoint is a plain one: a separate run with its config resumes from it and changes nothing.
    config = _config(**GRID[3])
    state = Checkpointer(os.path.join(dirs[3], "checkpoints")).latest_step()
    assert state == 12
    again = train_and_evaluate(config, dirs[3], ToyTask(config))
    np.testing.assert_allclose(again["w1_norm"], summaries[3]["w1_norm"], rtol=1e-6)


@pytest.mark.slow
def test_resume_after_an_interruption_is_exact(tmp_path, separate):
    configs = [_config(**o) for o in GRID[:2]]
    dirs = [str(tmp_path / f"t{i}") for i in range(2)]
    train_and_evaluate_many(configs, dirs, [ToyTask(c) for c in configs])
    for d in dirs:  # back to how an interruption after step 6 leaves it: steps 7-12 must be trained again
        Checkpointer(os.path.join(d, "checkpoints")).manager.delete(12)
        os.remove(os.path.join(d, "summary.json"))
        rows = [r for r in open(os.path.join(d, "metrics.jsonl")) if json.loads(r)["step"] <= 6]
        open(os.path.join(d, "metrics.jsonl"), "w").writelines(rows)
    train_and_evaluate_many(configs, dirs, [ToyTask(c) for c in configs])
    for d, ref in zip(dirs, separate[:2], strict=True):
        assert len(_curve(d)) == 12
        np.testing.assert_allclose(_curve(d), _curve(ref), rtol=1e-6)


@pytest.mark.slow
def test_task_hyperparameters_are_traced_per_trial(tmp_path):
    """The toy task reads its dropout rate with `hparam`: stacked rates equal separate runs with each rate."""
    configs = [_config(dropout=0.0), _config(dropout=0.5)]
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    train_and_evaluate_many(configs, dirs, [ToyTask(c) for c in configs])
    for i, config in enumerate(configs):
        train_and_evaluate(config, str(tmp_path / f"ref{i}"), ToyTask(config))
        np.testing.assert_allclose(_curve(dirs[i]), _curve(str(tmp_path / f"ref{i}")), rtol=1e-6)
    assert abs(_curve(dirs[0])[-1] - _curve(dirs[1])[-1]) > 1e-3


def test_what_changes_the_program_is_refused():
    ok = [_config(learning_rate=1e-3, weight_decay=0.1, warmup_steps=3), _config(learning_rate=1e-2, seed=4)]
    assert set(check_vectorizable(ok, ToyTask)) == {"learning_rate", "seed", "weight_decay", "warmup_steps"}
    with pytest.raises(ValueError, match=r"\['batch_size'\]"):
        check_vectorizable([_config(), _config(batch_size=8)], ToyTask)
    with pytest.raises(ValueError, match=r"\['num_train_steps'\]"):
        check_vectorizable([_config(), _config(num_train_steps=8)], ToyTask)
    with pytest.raises(ValueError, match=r"differ in clipping \(grad_clip_norm > 0\)"):
        check_vectorizable([_config(grad_clip_norm=0.0), _config(grad_clip_norm=1.0)], ToyTask)
    with pytest.raises(ValueError, match=r"differ in sgd momentum"):
        check_vectorizable([_config(optimizer="sgd", momentum=0.0), _config(optimizer="sgd", momentum=0.9)], ToyTask)
    with pytest.raises(ValueError, match="keep_best_metric"):
        check_vectorizable([_config(keep_best_metric="eval_loss")] * 2, ToyTask)


def test_hparam_reads_the_traced_value_inside_the_block():
    config = _config(dropout=0.1)
    assert hparam(config, "dropout") == 0.1
    with traced_hparams({"dropout": jnp.float32(0.3)}):
        assert float(hparam(config, "dropout")) == pytest.approx(0.3)
        assert hparam(config, "seed") == 0
    assert hparam(config, "dropout") == 0.1


@pytest.mark.slow
def test_a_diverging_trial_stops_alone(tmp_path):
    """Trial 1's eighth batch holds NaN targets: it stops there (metrics up to step 7, its step-6 checkpoint, no
    summary), exactly as a separate run of its config stops, while trial 0 trains on as a separate run does."""
    configs = [_config(learning_rate=1e-2), _config(seed=1, nan_at_step=8)]
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    summaries = train_and_evaluate_many(configs, dirs, [ToyTask(c) for c in configs])
    assert "error" not in summaries[0] and summaries[0]["step"] == 12
    assert "train_loss is nan at step 8" in summaries[1]["error"]
    assert not os.path.exists(os.path.join(dirs[1], "summary.json"))
    refs = [str(tmp_path / "ref_a"), str(tmp_path / "ref_b")]
    want = train_and_evaluate(configs[0], refs[0], ToyTask(configs[0]))
    with pytest.raises(FloatingPointError, match="at step 8"):
        train_and_evaluate(configs[1], refs[1], ToyTask(configs[1]))
    saved = lambda workdir: sorted(Checkpointer(os.path.join(workdir, "checkpoints")).all_steps())
    for d, ref in zip(dirs, refs, strict=True):
        assert sorted(read_metrics(d)) == sorted(read_metrics(ref))  # the logged steps: 1-12, and 1-7
        for key in ("train_loss", "eval_loss", "learning_rate"):
            np.testing.assert_allclose(_curve(d, key), _curve(ref, key), rtol=1e-6)
        assert saved(d) == saved(ref)
    assert sorted(read_metrics(dirs[1])) == list(range(1, 8)) and saved(dirs[1]) == [6]
    np.testing.assert_allclose(summaries[0]["w1_norm"], want["w1_norm"], rtol=1e-6)
