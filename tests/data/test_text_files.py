"""Own text files (seqjax.data.text_files): windows equal a hand-computed split of the files (checked by decoding),
char and byte tokens, eval_files, every bad input named with its file, nothing cached after a failed read; `lm`
end to end on a written folder and the one-line error for a glob with no match."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from seqjax.data import text_files
from seqjax.data.pipeline import Pipeline, stack
from seqjax.data.tokenizers import UNK, ByteTokenizer, CharTokenizer
from seqjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
A = "the quick brown fox jumps over the lazy dog. " * 3  # 135 characters
B = "pack my box with five dozen liquor jugs, ü ß é! " * 2  # 98 characters, some not ASCII


def _write(folder, name, content):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else lambda c: path.write_text(c, encoding="utf-8"))(content)
    return str(path)


def _texts(source, tok):
    return [tok.decode(ex["inputs"]) + tok.decode(ex["targets"][-1:]) for ex in source]


def _expected(text, n):
    return [text[i : i + n + 1] for i in range(0, len(text) - n, n)]


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_char_windows_are_the_split_of_each_file(tmp_path, fraction):
    _write(tmp_path, "d/a.txt", A)
    _write(tmp_path, "d/b.txt", B)
    n = 8
    train, held_out, tok = text_files.read(str(tmp_path / "d/*.txt"), n, eval_fraction=fraction)
    assert isinstance(tok, CharTokenizer)
    cut_a, cut_b = int(len(A) * (1 - fraction)), int(len(B) * (1 - fraction))
    assert tok.chars == sorted(set(A[:cut_a] + B[:cut_b]))
    assert _texts(train, tok) == _expected(A[:cut_a], n) + _expected(B[:cut_b], n)
    assert len(train) == len(_expected(A[:cut_a], n)) + len(_expected(B[:cut_b], n))
    # the held-out parts: characters the train parts lack are UNK, so compare ids
    want = [tok.encode(w) for w in _expected(A[cut_a:], n) + _expected(B[cut_b:], n)]
    got = [np.concatenate([ex["inputs"], ex["targets"][-1:]]) for ex in held_out]
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    ex = train[0]
    assert ex["inputs"].shape == ex["targets"].shape == (n,) and np.array_equal(ex["inputs"][1:], ex["targets"][:-1])
    with pytest.raises(IndexError):
        train[len(train)]


def test_byte_tokens_and_unknown_characters(tmp_path):
    _write(tmp_path, "a.txt", A + "é" * 20)  # é only in the held-out part
    train, held_out, tok = text_files.read(str(tmp_path / "a.txt"), 6, eval_fraction=0.2, tokens="byte")
    assert isinstance(tok, ByteTokenizer)
    text = A + "é" * 20
    cut = int(len(text) * 0.8)
    train_bytes = text[:cut].encode()
    assert [tok.decode(np.concatenate([e["inputs"], e["targets"][-1:]])) for e in train] == [
        train_bytes[i : i + 7].decode() for i in range(0, len(train_bytes) - 6, 6)
    ]
    assert len(held_out) == (len(text[cut:].encode()) - 7) // 6 + 1
    _, held_out, tok = text_files.read(str(tmp_path / "a.txt"), 6, eval_fraction=0.2)
    assert UNK in np.concatenate([e["inputs"] for e in held_out])


def test_eval_files_and_several_globs(tmp_path):
    _write(tmp_path, "train/a.txt", A)
    _write(tmp_path, "more/b.txt", B)
    _write(tmp_path, "eval/c.txt", B[:40])
    patterns = f"{tmp_path}/train/*.txt, {tmp_path}/more/*.txt,{tmp_path}/train/a.txt"  # a.txt only once
    train, held_out, tok = text_files.read(patterns, 10, eval_files=f"{tmp_path}/eval/*.txt", eval_fraction=0.5)
    assert _texts(train, tok) == _expected(A, 10) + _expected(B, 10)
    assert _texts(held_out, tok) == _expected(B[:40], 10)


def test_the_vocabulary_is_cached_after_a_good_read_only(tmp_path):
    cache = tmp_path / "cache"
    _write(tmp_path, "good.txt", A)
    _write(tmp_path, "short.txt", "tiny")
    with pytest.raises(ConfigError, match=r"short\.txt"):
        text_files.read(f"{tmp_path}/good.txt,{tmp_path}/short.txt", 8, cache_dir=str(cache))
    assert not cache.exists() or not os.listdir(cache)
    with pytest.raises(ConfigError, match=r"short\.txt"):
        text_files.read(f"{tmp_path}/good.txt", 8, eval_files=f"{tmp_path}/short.txt", cache_dir=str(cache))
    assert not cache.exists() or not os.listdir(cache)
    _, _, tok = text_files.read(f"{tmp_path}/good.txt", 8, cache_dir=str(cache))
    (saved,) = os.listdir(cache)
    assert saved.startswith("text-") and json.loads((cache / saved).read_text())["chars"] == tok.chars
    _, _, again = text_files.read(f"{tmp_path}/good.txt", 8, cache_dir=str(cache))
    assert again.chars == tok.chars and os.listdir(cache) == [saved]


@pytest.mark.parametrize(
    "name, content, kwargs, key, words",
    [
        ("empty.txt", "", {}, "text_files", ["empty.txt", "empty"]),
        ("latin1.txt", A.encode() + b"caf\xe9" + A.encode(), {}, "text_files", ["latin1.txt", "UTF-8", "byte 138"]),
        ("short.txt", "tiny file", {}, "text_files", ["short.txt", "train part", "fewer"]),
        ("tail.txt", A, {"eval_fraction": 0.02}, "text_files", ["tail.txt", "held-out part", "fewer"]),
        ("a.txt", A, {"eval_fraction": 0.0}, "eval_fraction", ["0.0", "(0, 1)"]),
        ("a.txt", A, {"eval_fraction": 1.0}, "eval_fraction", ["1.0", "(0, 1)"]),
        ("a.txt", A, {"tokens": "word"}, "tokens", ["'word'"]),
    ],
)
def test_bad_input_is_named(tmp_path, name, content, kwargs, key, words):
    path = _write(tmp_path, name, content)
    with pytest.raises(ConfigError) as e:
        text_files.read(path, 8, cache_dir=str(tmp_path / "cache"), **kwargs)
    assert e.value.key == key and all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "cache").exists()


def test_no_match_and_bad_eval_files_are_named(tmp_path):
    good = _write(tmp_path, "a.txt", A)
    for patterns in (f"{tmp_path}/nothing/*.txt", f"{good},{tmp_path}/none*.md"):
        with pytest.raises(ConfigError, match=r"no file matches '.*(nothing/\*\.txt|none\*\.md)'") as e:
            text_files.read(patterns, 8)
        assert e.value.key == "text_files"
    with pytest.raises(ConfigError, match="no files given"):
        text_files.read("", 8)
    _write(tmp_path, "eval/bad.txt", b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"bad\.txt is not UTF-8 text: byte 0") as e:
        text_files.read(good, 8, eval_files=f"{tmp_path}/eval/*.txt")
    assert e.value.key == "eval_files"


def test_concatenated_finds_each_example():
    parts = text_files.Concatenated([[0, 1, 2], [], [3], [4, 5]])
    assert len(parts) == 6 and [parts[i] for i in range(6)] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(IndexError):
        parts[6]


def test_pipeline_batches_are_a_function_of_seed_and_step_with_per_process_rows(tmp_path):
    _write(tmp_path, "a.txt", A * 3)
    _write(tmp_path, "b.txt", B * 3)
    train, _, _ = text_files.read(f"{tmp_path}/*.txt", 8)
    make = lambda **kw: Pipeline(train, 8, seed=3, collate=stack, **kw)
    whole, again = make(process_index=0, process_count=1), make(process_index=0, process_count=1)
    for k in (5, 0, 17):  # any order: a resume reads batch k alone
        batch = whole.batch(k)
        assert all(np.array_equal(batch[f], again.batch(k)[f]) for f in ("inputs", "targets"))
        halves = [make(process_index=i, process_count=2).process_batch(k) for i in (0, 1)]
        assert np.array_equal(np.concatenate([h["inputs"] for h in halves]), batch["inputs"])
    assert not np.array_equal(whole.batch(0)["inputs"], Pipeline(train, 8, seed=4, collate=stack).batch(0)["inputs"])


def _lm(workdir, data, *fields):
    tiny = dict(
        dataset="text", text_files=f"{data}/*.txt", seq_len=16, num_train_steps=3, batch_size=4, eval_batch_size=4,
        num_eval_examples=4, num_samples=2, log_every_steps=1, checkpoint_every_steps=3, eval_every_steps=3,
        warmup_steps=1, data_dir=str(data / "tfds"),
        **{"model.emb_dim": 16, "model.num_heads": 2, "model.mlp_dim": 32, "model.num_layers": 1},
    )  # fmt: skip
    args = [f"--config.{k}={v}" for k, v in tiny.items()] + list(fields)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "experiments.lm", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_lm_trains_on_a_text_folder(tmp_path):
    data = tmp_path / "corpus"
    _write(data, "one.txt", A * 4)
    _write(data, "two.txt", B * 4)
    out = _lm(tmp_path / "run", data)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert np.isfinite(summary["eval_perplexity"]) and summary["eval_perplexity"] > 1
    assert (tmp_path / "run" / "samples.txt").exists()
    assert [f for f in os.listdir(data / "tfds" / "seqjax") if f.startswith("text-")]


@pytest.mark.slow
def test_lm_says_which_glob_matches_nothing(tmp_path):
    out = _lm(tmp_path / "run", tmp_path / "missing")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-4000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and out.stderr.rstrip().endswith(lines[0]), out.stderr[-4000:]
    assert lines[0].startswith("error: config.text_files: no file matches") and "missing/*.txt" in lines[0]
