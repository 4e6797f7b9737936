"""Sweeps (`python -m experiments.sweep`): the spaces expand to exactly the trials written, each in its own workdir
with its own config; a killed sweep rerun finishes only what was missing; a failing trial is recorded and the rest
complete; a vectorised sweep gives each configuration the losses of its separate run; Optuna workers share a sweep.

The experiment is tests/experiments/toy_experiment.py (a small regression, a few seconds per trial)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from seqjax import sweeps as sw
from seqjax.training import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = "tests.experiments.toy_experiment"


def _sweep_file(tmp_path, body, name="sweep.py"):
    path = tmp_path / name
    path.write_text(f"from seqjax import sweeps\n\n\ndef get_sweep():\n    return {body}\n")
    return str(path)


def _sweep(workdir, sweep_file, *args, wait=True, experiment=TOY):
    cmd = [sys.executable, "-m", "experiments.sweep", "--experiment", experiment, "--workdir", str(workdir)]
    cmd += ["--sweep", sweep_file, *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _trial(workdir, i):
    return json.load(open(os.path.join(sw.trial_dir(str(workdir), i), "trial.json")))


def _losses(workdir, i):
    return np.array([r["train_loss"] for r in read_metrics(sw.trial_dir(str(workdir), i)).values()])


def test_spaces_expand_to_exactly_the_trials_written():
    g = sw.grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert g.expand() == [{"a": a, "b": b} for a in (1, 2) for b in ("x", "y", "z")]
    assert sw.product(sw.grid("a", [1, 2]), sw.grid("b", [3])).expand() == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert sw.zip(sw.grid("a", [1, 2]), sw.grid("b", [3, 4])).expand() == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert sw.chain(sw.grid("a", [1]), sw.trials([{"b": 2}])).expand() == [{"a": 1}, {"b": 2}]
    r = sw.random({"lr": sw.log_uniform(1e-4, 1e-1), "n": sw.int_uniform(1, 3), "c": sw.choice(["p", "q"])}, 200, 7)
    draws = r.expand()
    assert draws == r.expand()  # the same seed, the same trials
    assert draws != sw.random({"lr": sw.log_uniform(1e-4, 1e-1)}, 200, 8).expand()
    lrs = np.log10([d["lr"] for d in draws])
    assert lrs.min() >= -4 and lrs.max() <= -1 and 0.15 < np.mean(lrs < -3.25) < 0.35  # uniform in log space: ~1/4
    assert {d["n"] for d in draws} == {1, 2, 3} and {d["c"] for d in draws} == {"p", "q"}
    numpy = sw.Sweep(sw.grid("lr", np.logspace(-3, -2, 2))).trials()
    assert numpy == [{"lr": 0.001}, {"lr": 0.01}] and type(numpy[0]["lr"]) is float  # written as plain Python
    s = sw.Sweep(sw.grid("a", [1, 2]), fixed={"b": 0, "a": 9})
    assert s.trials() == [{"b": 0, "a": 1}, {"b": 0, "a": 2}] and s.swept_keys() == ["a"]
    with pytest.raises(ValueError, match="equal length"):
        sw.zip(sw.grid("a", [1, 2]), sw.grid("b", [3])).expand()
    for bad in (lambda: sw.grid("a", []), lambda: sw.log_uniform(0, 1), lambda: sw.Sweep(sw.grid("a", [1]), mode="up")):
        with pytest.raises(ValueError):
            bad()


def test_the_old_module_path_still_names_the_sweep_language():
    from seqjax.training import sweep as old  # sweep files written before seqjax.sweeps existed

    assert old.Sweep is sw.Sweep and old.grid is sw.grid and old.trial_config is sw.trial_config


def test_overrides_are_checked_against_the_config():
    base = os.path.join(ROOT, "experiments", "configs", "dalle.py")
    config = sw.trial_config(base, None, {"learning_rate": 0.5, "vqvae.model.num_codes": 16})
    assert config.learning_rate == 0.5 and config.vqvae.model.num_codes == 16
    with pytest.raises(ValueError, match=r"config\.lr: no such key"):
        sw.trial_config(base, None, {"lr": 0.1})
    with pytest.raises(ValueError, match=r"config\.model\.num_layers: 'two' has the wrong type \(int"):
        sw.trial_config(base, None, {"model.num_layers": "two"})
    with pytest.raises(
        ValueError, match=r"config\.num_layers: no such key in the config \(moved to model\.num_layers\)"
    ):
        sw.trial_config(base, None, {"num_layers": 2})


@pytest.mark.slow
def test_a_grid_over_two_keys_gives_exactly_its_trials_and_workdirs(tmp_path):
    sweep_file = _sweep_file(
        tmp_path, 'sweeps.Sweep(sweeps.grid({"learning_rate": [1e-3, 3e-2], "warmup_steps": [1, 3]}))'
    )
    out = _sweep(tmp_path / "s", sweep_file, "--parallel", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    want = [{"learning_rate": lr, "warmup_steps": w} for lr in (1e-3, 3e-2) for w in (1, 3)]
    assert sorted(p for p in os.listdir(tmp_path / "s") if p.startswith("trial_")) == [
        f"trial_{i:03d}" for i in range(4)
    ]
    for i, overrides in enumerate(want):
        d = sw.trial_dir(str(tmp_path / "s"), i)
        info = _trial(tmp_path / "s", i)
        assert info["overrides"] == overrides and info["status"] == "done" and info["attempts"] == 1
        # The run used the trial's values: the checkpointed config, and the logged warm-up of the learning rate.
        steps = read_metrics(d)
        assert steps[1]["learning_rate"] == 0.0  # the first update is step 0 of the warm-up
        assert steps[2]["learning_rate"] == pytest.approx(
            overrides["learning_rate"] * min(1, 1 / overrides["warmup_steps"])
        )
        assert os.path.exists(os.path.join(d, "summary.json")) and os.path.exists(os.path.join(d, "checkpoints"))
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [(float(r["learning_rate"]), int(r["warmup_steps"])) for r in rows] == [tuple(w.values()) for w in want]
    table = open(tmp_path / "s" / "results.md").read().splitlines()
    ranked = [float(line.split("|")[4]) for line in table if line.startswith("| trial_")]
    assert ranked == sorted(ranked) and len(ranked) == 4  # best (lowest eval_loss) first
    for png in ("curves.png", "metric_vs_learning_rate.png", "metric_vs_warmup_steps.png"):
        assert os.path.getsize(tmp_path / "s" / png) > 1000
    again = _sweep(tmp_path / "s", sweep_file)  # all finished: nothing runs
    assert "4 finished, 0 to run" in again.stdout and all(_trial(tmp_path / "s", i)["attempts"] == 1 for i in range(4))


@pytest.mark.slow
def test_a_killed_sweep_rerun_finishes_only_what_was_missing(tmp_path):
    fixed = '{"num_train_steps": 30, "checkpoint_every_steps": 5, "sleep": 0.1}'
    sweep_file = _sweep_file(tmp_path, f'sweeps.Sweep(sweeps.grid("learning_rate", [1e-3, 3e-3, 1e-2]), fixed={fixed})')
    proc = _sweep(tmp_path / "s", sweep_file, wait=False)
    ckpts = os.path.join(sw.trial_dir(str(tmp_path / "s"), 1), "checkpoints")
    deadline = time.time() + 300
    while not (os.path.isdir(ckpts) and any(p.isdigit() for p in os.listdir(ckpts))):  # trial 1 is under way
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # the sweep dies at once; its running trial is told to stop (and saves)
    proc.wait()
    time.sleep(3)
    assert _trial(tmp_path / "s", 0)["status"] == "done"
    assert _trial(tmp_path / "s", 2)["attempts"] == 0  # never started
    out = _sweep(tmp_path / "s", sweep_file)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 finished, 2 to run" in out.stdout
    infos = [_trial(tmp_path / "s", i) for i in range(3)]
    assert [i["status"] for i in infos] == ["done"] * 3
    assert [i["attempts"] for i in infos] == [1, 2, 1]  # trial 0 not rerun; trial 1 resumed; trial 2 run once
    log = open(os.path.join(sw.trial_dir(str(tmp_path / "s"), 1), "log.txt")).read()
    assert "resumed from step" in log
    assert len(_losses(tmp_path / "s", 1)) == 30


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_rest_complete(tmp_path):
    sweep_file = _sweep_file(tmp_path, 'sweeps.Sweep(sweeps.grid("nan_at_step", [-1, 3, -1]))')
    out = _sweep(tmp_path / "s", sweep_file, "--parallel", "2")
    assert out.returncode == 1, out.stdout + out.stderr
    infos = [_trial(tmp_path / "s", i) for i in range(3)]
    assert [i["status"] for i in infos] == ["done", "failed", "done"]
    assert "FloatingPointError" in infos[1]["error"] and "at step 3" in infos[1]["error"]
    assert "1 trial(s) failed" in out.stdout
    rows = {r["trial"]: r for r in csv.DictReader(open(tmp_path / "s" / "results.csv"))}
    assert rows["1"]["status"] == "failed" and "FloatingPointError" in rows["1"]["error"]
    assert open(tmp_path / "s" / "results.md").read().splitlines()[-1].startswith("| trial_001")  # failed: last


@pytest.mark.slow
def test_a_bad_sweep_fails_before_running_anything(tmp_path):
    sweep_file = _sweep_file(tmp_path, 'sweeps.Sweep(sweeps.grid("learnin_rate", [1e-3]))')
    out = _sweep(tmp_path / "s", sweep_file)
    assert out.returncode != 0 and "learnin_rate" in out.stdout + out.stderr
    assert not os.path.exists(tmp_path / "s" / "trial_000")
    vec = _sweep_file(tmp_path, 'sweeps.Sweep(sweeps.grid("batch_size", [8, 16]))', "vec.py")
    out = _sweep(tmp_path / "v", vec, "--vectorize")
    assert out.returncode != 0 and "['batch_size']" in out.stdout + out.stderr


@pytest.mark.slow
def test_a_vectorized_sweep_of_learning_rates_and_seeds_equals_separate_runs(tmp_path):
    sweep_file = _sweep_file(tmp_path, 'sweeps.Sweep(sweeps.grid({"learning_rate": [1e-3, 3e-2], "seed": [0, 1]}))')
    vec = _sweep(tmp_path / "vec", sweep_file, "--vectorize")
    assert vec.returncode == 0, vec.stdout + vec.stderr
    sep = _sweep(tmp_path / "sep", sweep_file, "--parallel", "2")
    assert sep.returncode == 0, sep.stdout + sep.stderr
    for i in range(4):
        assert _trial(tmp_path / "vec", i)["status"] == "done"
        a, b = _losses(tmp_path / "vec", i), _losses(tmp_path / "sep", i)
        assert len(a) == 8
        np.testing.assert_allclose(a, b, rtol=1e-6)
    finals = {round(float(_losses(tmp_path / "vec", i)[-1]), 6) for i in range(4)}
    assert len(finals) == 4  # four different configurations


@pytest.mark.slow
def test_optuna_workers_share_a_sweep(tmp_path):
    pytest.importorskip("optuna")
    sweep_file = _sweep_file(tmp_path, 'sweeps.Sweep(sweeps.grid("learning_rate", [1e-3, 3e-3, 1e-2, 3e-2]))')
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = ("--engine", "optuna", "--storage", storage, "--study", "s")
    workers = [_sweep(tmp_path / "s", sweep_file, *args, wait=False) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs
    infos = [_trial(tmp_path / "s", i) for i in range(4)]
    assert [i["status"] for i in infos] == ["done"] * 4 and [i["attempts"] for i in infos] == [1] * 4, outs
    import optuna

    study = optuna.load_study(study_name="s", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["trial_index"] for t in complete) == [0, 1, 2, 3]
    best = min(complete, key=lambda t: t.value).params["trial_index"]
    ranked = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert float(ranked[best]["eval_loss"]) == pytest.approx(min(t.value for t in complete))
