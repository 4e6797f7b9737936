"""Command-line errors a person can read, and one writer per workdir, through the entry points as the README runs
them (`python -m experiments.NAME --workdir DIR --config.key=value ...`).

A bad config (an unknown key, a wrong type, a value out of range, a batch the devices cannot split, a dataset
missing from data_dir, a workdir that cannot be written) ends the program with one line on stderr,
`error: config.KEY: what is wrong (what is allowed)`, and exit status 2, before anything compiles. A second run on a
workdir that a first run is writing exits at once naming the workdir and the first one's PID; the first finishes
alone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from seqjax.runtime import hugepage_environ

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = ["dalle", "lm", "rnn_lm", "seq2seq", "sequence_models", "vit", "vqvae"]
# The tiny seq2seq run of tests/experiments/test_experiments.py.
TINY = dict(
    log_every_steps=1, checkpoint_every_steps=10, eval_every_steps=10, batch_size=8, eval_batch_size=8, warmup_steps=1,
    num_eval_examples=16, num_train_examples=64, max_len=6, beam_size=2,
    **{"model.emb_dim": 16, "model.num_heads": 2, "model.mlp_dim": 32},
)  # fmt: skip


def _env(**extra):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, **extra}


def _run(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    """The `error: ...` line, after checking that it is the only one, that there is no traceback and status 2."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and out.stderr.rstrip().endswith(lines[0]), out.stderr[-4000:]
    return lines[0]


def _seq2seq(workdir, *args, **fields):
    return ["experiments.seq2seq", f"--workdir={workdir}", *args, *(f"--config.{k}={v}" for k, v in fields.items())]


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_unknown_key_is_one_line_with_the_suggestion(tmp_path, name):
    out = _run([f"experiments.{name}", f"--workdir={tmp_path / 'run'}", "--config.lerning_rate=1e-3"])
    line = _one_error_line(out)
    assert line == "error: config.lerning_rate: no such key (did you mean config.learning_rate?)"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow_beyond(3)
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"batch_size": 1.5}, "error: config.batch_size: '1.5' has the wrong type (int, like 64)"),
        ({"num_train_steps": 0}, "error: config.num_train_steps: 0 is too small (an integer >= 1)"),
        ({"learning_rate": -1}, "error: config.learning_rate: -1.0 is negative (>= 0)"),
        ({"parallel": "tpu"}, "error: config.parallel: 'tpu' is unknown (one of 'none', 'pmap', 'jit')"),
        ({"model.emb_dimm": 8}, "error: config.model.emb_dimm: no such key (did you mean config.model.emb_dim?)"),
        ({"num_layers": 4}, "error: config.num_layers: no such key (moved to config.model.num_layers)"),
        ({"emb_dim": 8}, "error: config.emb_dim: no such key (moved to config.model.emb_dim)"),
    ],
)
def test_seq2seq_config_errors_are_one_line(tmp_path, fields, expected):
    assert _one_error_line(_run(_seq2seq(tmp_path / "run", **fields))) == expected
    assert not (tmp_path / "run").exists()  # nothing written (and nothing compiled)


@pytest.mark.slow
def test_a_batch_the_devices_cannot_split_is_one_line(tmp_path):
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = _run(_seq2seq(tmp_path / "run", parallel="pmap", batch_size=7), env=env)
    expected = "error: config.batch_size: 7 is not divisible by the 2 devices of parallel='pmap' (a multiple of 2)"
    assert _one_error_line(out) == expected


@pytest.mark.slow_beyond(1)
@pytest.mark.parametrize(
    ("name", "variant", "dataset"),
    [("vit", "mnist", "mnist"), ("seq2seq", "translation", "ted_hrlr_translate/pt_to_en")],
)
def test_a_dataset_missing_from_data_dir_is_one_line(tmp_path, name, variant, dataset):
    config = os.path.join("experiments", "configs", f"{name}.py:{variant}")
    out = _run([f"experiments.{name}", f"--workdir={tmp_path / 'run'}", "--config", config,
                f"--config.data_dir={tmp_path / 'empty'}"])  # fmt: skip
    line = _one_error_line(out)
    assert line.startswith(f"error: config.data_dir: {dataset} is not prepared in {tmp_path / 'empty'}")
    assert f"tfds build {dataset} --data_dir DIR" in line


@pytest.mark.slow
def test_an_unwritable_workdir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")  # a path under a file: not writable, even for root
    out = _run(_seq2seq(tmp_path / "file" / "run"))
    line = _one_error_line(out)
    assert line == f"error: workdir: cannot write to {tmp_path / 'file' / 'run'}: Not a directory " \
        "(a directory this user may write)"  # fmt: skip
    # The entry point says whether it restarted with glibc's huge pages (CPU host) and how to turn that off.
    restarted = "GLIBC_TUNABLES" not in os.environ and hugepage_environ(os.environ) is not None
    status = next(s for s in out.stderr.splitlines() if s.startswith("seqjax: glibc huge pages"))
    assert ("SEQJAX_HUGEPAGES=0 turns this off" in status) == restarted, status


@pytest.mark.slow
def test_flag_and_config_file_errors_are_one_line(tmp_path):
    out = _run(["experiments.vit", f"--workdir={tmp_path}", "--config", "experiments/configs/vit.py:nonsense"])
    assert _one_error_line(out).startswith("error: --config: unknown vit config variant 'nonsense'")
    assert _one_error_line(_run(["experiments.seq2seq"])).startswith("error: --workdir: missing")


def test_a_sweep_over_an_unknown_key_is_one_line(tmp_path):
    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text(
        "from seqjax import sweeps\n\n\ndef get_sweep():\n"
        '    return sweeps.Sweep(sweeps.grid("lerning_rate", [1e-3]))\n'
    )
    out = _run(["experiments.sweep", "--experiment", "seq2seq", "--workdir", str(tmp_path / "s"), "--sweep",
                str(sweep_file)])  # fmt: skip
    line = _one_error_line(out)
    assert line.startswith("error: config.lerning_rate: no such key in the config (did you mean learning_rate?)")
    assert not (tmp_path / "s" / "trial_000").exists()


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_exits_and_the_first_writes_each_step_once(tmp_path):
    workdir, data = tmp_path / "run", tmp_path / "data"
    first = subprocess.Popen(
        [sys.executable, "-m", *_seq2seq(workdir, **TINY, num_train_steps=40, data_dir=data)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        t0 = time.time()
        while not (workdir / ".lock").exists() or not (workdir / ".lock").read_text():
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()[0][-3000:]
            time.sleep(0.05)
        started = time.time()
        second = _run(_seq2seq(workdir, **TINY, num_train_steps=40, data_dir=data))
        assert time.time() - started < 30  # at once: before building its task or compiling
        line = _one_error_line(second)
        assert line.startswith(f"error: workdir: {workdir} is in use by process {first.pid} on host ")
        assert first.poll() is None, "the first run should still be training (make it longer)"
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == list(range(1, 41))  # each step once: only the first run wrote
