"""Every experiment entry point runs for a few steps on a tiny config as the README says (`python -m
experiments.NAME --workdir DIR --config.key=value ...`), writes its checkpoints, metrics, summary and pictures, and
resumes when run again, continuing with the numbers of an uninterrupted run, bitwise; the real-dataset variants run
on tfds.testing.mock_data; a SIGKILLed run resumes with a bitwise-identical loss curve."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = dict(
    log_every_steps=1,
    checkpoint_every_steps=2,
    eval_every_steps=2,
    batch_size=8,
    eval_batch_size=8,
    warmup_steps=1,
    num_eval_examples=16,
    num_train_examples=64,
)


def _model(**fields):
    return {f"model.{k}": v for k, v in fields.items()}  # the model's fields are in config.model


TINY = {
    "seq2seq": dict(max_len=6, beam_size=2, **_model(emb_dim=16, num_heads=2, mlp_dim=32)),
    "lm": dict(seq_len=24, max_depth=1, num_samples=8, **_model(emb_dim=16, num_heads=2, mlp_dim=32)),
    "rnn_lm": dict(seq_len=24, max_depth=1, num_samples=8, **_model(emb_dim=8, hidden_size=16, cell="gru")),
    "vit": _model(variant="Mu/8"),
    "vqvae": _model(num_codes=8, code_dim=4, channels=8),
    "sequence_models": dict(length=24, score_from=4, forecast_from=16, horizon=3, **_model(hidden=4)),
    "dalle": dict(
        **_model(emb_dim=16, num_heads=2, num_layers=1, mlp_dim=32),
        num_eval_examples=8,
        eval_batch_size=8,
        **{
            "vqvae.model.num_codes": 8,
            "vqvae.model.code_dim": 4,
            "vqvae.model.channels": 8,
            "vqvae.num_train_steps": 2,
            "vqvae.batch_size": 8,
            "vqvae.warmup_steps": 1,
            "classifier.warmup_steps": 1,
            "vqvae.eval_batch_size": 8,
            "vqvae.num_eval_examples": 8,
            "classifier.model.variant": "Mu/8",
            "classifier.num_train_steps": 2,
            "classifier.batch_size": 8,
            "classifier.eval_batch_size": 8,
            "classifier.num_eval_examples": 8,
        },
    ),
}
PICTURES = {
    "seq2seq": ["attention.png", "examples.txt"],
    "lm": ["samples.txt"],
    "rnn_lm": ["samples.txt"],
    "vit": ["rollout.png"],
    "vqvae": ["reconstructions.png"],
    "sequence_models": ["predictions.png", "gradients.png", "errors.md"],
    "dalle": ["generated.png", "tokens.npz", "vqvae/reconstructions.png", "classifier/rollout.png"],
}


def _command(name, workdir, steps, data, **extra):
    fields = {**COMMON, **TINY[name], "num_train_steps": steps, "data_dir": str(data), **extra}
    if name == "dalle":
        fields["num_eval_examples"] = 8
    args = [f"--config.{k}={v}" for k, v in fields.items()]
    return [sys.executable, "-m", f"experiments.{name}", f"--workdir={workdir}", *args]


def _run(cmd, wait=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(workdir):
    rows = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        rows[row["step"]] = row.get("train_loss", rows.get(row["step"]))
    return rows


def _rows(lines):
    """metrics.jsonl lines as {step: row}, without the timing (the one field that is not a pure function of the run)."""
    rows = {}
    for line in lines:
        row = json.loads(line)
        row.pop("steps_per_sec", None)
        rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return rows


def _state_files(step_dir):
    """{relative path: bytes} of a checkpoint step's files, without Orbax's metadata (it holds timestamps)."""
    out = {}
    for dirpath, _, names in os.walk(step_dir):
        for n in names:
            if not n.startswith("_") and n != "commit_success.txt":
                path = os.path.join(dirpath, n)
                out[os.path.relpath(path, step_dir)] = open(path, "rb").read()
    return out


def _stage(workdir):
    """A dalle stage's checkpoint files, summary, and when the summary was written (a rerun reads a finished stage
    back: it neither trains nor evaluates it again)."""
    summary = workdir / "summary.json"
    return {**_state_files(workdir / "checkpoints"), "summary": summary.read_text(), "at": summary.stat().st_mtime_ns}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_runs_writes_its_files_and_resumes(tmp_path, name):
    """Six steps with checkpoints at 2, 4, 6; then the run is set back to the state of one stopped after its step-4
    checkpoint (step 6's checkpoint moved away) and the same command is run again: it resumes from step 4 and logs
    steps 5 and 6 with the same numbers, bitwise, and writes the same step-6 checkpoint (parameters, optimizer state,
    PRNG key, model state) and summary as the uninterrupted run. A resume that restarted the data, the optimizer or
    the keys, or retrained dalle's finished stages, would differ."""
    workdir, data = tmp_path / "run", tmp_path / "data"
    cmd = _command(name, workdir, 6, data)
    _run(cmd)
    for f in ["metrics.jsonl", "summary.json", "curves.png", *PICTURES[name]]:
        assert (workdir / f).stat().st_size > 0, f
    assert any((workdir / "tensorboard").iterdir())
    ckpts = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 6]
    summary = json.load(open(workdir / "summary.json"))
    assert summary["step"] == 6 and any(k.startswith("eval_") for k in summary)
    lines = open(workdir / "metrics.jsonl").read().splitlines()
    assert sorted(_rows(lines)) == list(range(1, 7))
    stages = [workdir / s for s in ("vqvae", "classifier")] if name == "dalle" else []
    stage_files = {s: _stage(s) for s in stages}
    final = _state_files(ckpts / "6")
    assert final, "no checkpoint files to compare"
    shutil.move(ckpts / "6", tmp_path / "step6")

    out = _run(cmd)
    assert "resumed from step 4" in out
    resumed = _rows(open(workdir / "metrics.jsonl").read().splitlines()[len(lines) :])
    assert sorted(resumed) == [5, 6]
    assert resumed == {s: r for s, r in _rows(lines).items() if s > 4}  # bitwise: losses, rates, evaluations
    assert _state_files(ckpts / "6") == final
    assert json.load(open(workdir / "summary.json")) == summary
    for s in stages:  # finished stages are read back, not trained again nor rewritten
        assert _stage(s) == stage_files[s], s
    if name == "dalle":  # a new decoder run on the finished tokenizer and judge of that one, in a fresh workdir
        other = tmp_path / "other"
        stages = {"vqvae_workdir": workdir / "vqvae", "classifier_workdir": workdir / "classifier"}
        _run(_command(name, other, 2, data, **stages))
        assert (other / "generated.png").stat().st_size > 0 and (other / "tokens.npz").exists()
        assert not (other / "vqvae").exists() and not (other / "classifier").exists()


@pytest.mark.slow
def test_sigkill_then_the_same_command_gives_the_same_loss_curve(tmp_path):
    data = tmp_path / "data"
    ref = tmp_path / "ref"
    _run(_command("seq2seq", ref, 30, data))
    cut = tmp_path / "cut"
    proc = _run(_command("seq2seq", cut, 30, data, checkpoint_every_steps=5), wait=False)
    t0 = time.time()
    while time.time() - t0 < 300:
        if (cut / "metrics.jsonl").exists() and max(_losses(cut), default=0) >= 12:
            break
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_losses(cut)) < 30
    out = _run(_command("seq2seq", cut, 30, data, checkpoint_every_steps=5))
    assert "resumed from step" in out
    assert _losses(cut) == _losses(ref)  # bitwise equal floats at every step


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "dataset"),
    [
        ("vit", "mnist"),
        ("lm", "tiny_shakespeare"),
        ("lm", "lm1b"),
        ("rnn_lm", "tiny_shakespeare"),
        ("seq2seq", "ted_hrlr_translate/pt_to_en"),
    ],
)
def test_real_dataset_variants_on_mocked_data(tmp_path, name, dataset):
    import importlib

    import jax
    import tensorflow_datasets as tfds

    from seqjax.sweeps import apply_overrides
    from seqjax.training import train_and_evaluate

    module = importlib.import_module(f"experiments.{name}")
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    apply_overrides(
        config, {**COMMON, **TINY[name], "num_train_steps": 2, "dataset": dataset, "data_dir": str(tmp_path)}
    )
    if dataset == "lm1b":
        config.vocab_size = 40
    if dataset == "mnist":
        config.model.variant = "Mu/7"  # 28x28 images
    if name == "seq2seq":
        config.update(dict(subword_vocab_size=40, max_len=12))
    task_cls = {"vit": "ViTTask", "lm": "LMTask", "rnn_lm": "RNNLMTask", "seq2seq": "Seq2SeqTask"}[name]
    with tfds.testing.mock_data(num_examples=64), jax.numpy_dtype_promotion("standard"):
        task = getattr(module, task_cls)(config)
        summary = train_and_evaluate(config, str(tmp_path / "run"), task)
    assert summary["step"] == 2 and (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("name", sorted(TINY))
def test_configs_have_the_shared_fields_and_variants(name):
    import importlib

    from seqjax.training import validate_config

    configs = importlib.import_module(f"experiments.configs.{name}")
    validate_config(configs.get_config())
    validate_config(configs.get_config("accelerator"))
    with pytest.raises(ValueError, match="unknown"):
        configs.get_config("nonsense")


def test_corpus_bleu_against_hand_computed_values():
    from experiments.seq2seq import corpus_bleu

    ref = "the cat is on the mat".split()
    assert corpus_bleu([ref], [ref]) == pytest.approx(100.0)
    # hyp "the cat the cat on the mat" (7 words): clipped 1-grams 5/7 (the x2, cat, on, mat), 2-grams 3/6 (the cat,
    # on the, the mat), 3-grams 1/5 (on the mat), no 4-gram in common; longer than ref: no brevity penalty.
    hyp = "the cat the cat on the mat".split()
    import math

    p = [5 / 7, 3 / 6, 1 / 5]
    assert corpus_bleu([hyp], [ref], max_n=3) == pytest.approx(100 * math.exp(sum(map(math.log, p)) / 3), rel=1e-9)
    assert corpus_bleu([hyp], [ref]) == 0.0
    short = "the cat".split()  # 1- and 2-grams match fully, no 3-gram at all: BLEU-4 is 0
    assert corpus_bleu([short], [ref]) == 0.0
    assert corpus_bleu([short], [ref], max_n=2) == pytest.approx(100 * math.exp(1 - 6 / 2))
