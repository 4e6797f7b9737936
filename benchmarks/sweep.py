"""A vectorised sweep of 8 learning rates against one run of the same experiment, whole commands, side by side.

    python benchmarks/sweep.py [--size small|default] [--trials 8] [--separate]

Times, on this machine and in this run:
  one run:      python -m experiments.seq2seq --workdir A --config.learning_rate=... (everything: start-up, data,
                compiling, training, evaluation, decoding, checkpoints, pictures);
  vectorised:   python -m experiments.sweep --experiment seq2seq --vectorize over `--trials` learning rates (all of
                them trained in one vmapped program, each logged, checkpointed, evaluated and decoded as its own run);
  --separate:   the same sweep without --vectorize (one process per trial, --parallel 2), what one would do instead.
Prints the wall times, their ratios, and the steady-state time per step (from metrics.jsonl).

Sizes: "small" is a 1+1-layer seq2seq Transformer of width 32 at batch 16 (a small model whose steps leave a CPU
or an accelerator mostly idle: where stacking trials pays); "default" is the experiment's CPU config (width 64,
2+2 layers, batch 64: compute-bound on 2 cores, so 8 trials cost close to 8x the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "small": dict(
        batch_size=16,
        num_train_steps=400,
        **{f"model.{k}": v for k, v in dict(emb_dim=32, num_heads=2, num_layers=1, mlp_dim=64).items()},
    ),
    "default": dict(num_train_steps=400),
}
COMMON = dict(eval_every_steps=0, checkpoint_every_steps=200, log_every_steps=50, warmup_steps=20)


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def _step_ms(workdir: str) -> float:
    """Median time per step over the logged rows after the first (which holds the compile)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if line.strip()]
    rates = sorted(r["steps_per_sec"] for r in rows[1:] if "steps_per_sec" in r)
    return 1000.0 / rates[len(rates) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--separate", action="store_true", help="also time the sweep without --vectorize")
    args = parser.parse_args()
    fixed = {**COMMON, **SIZES[args.size]}
    lrs = [float(f"{1e-3 * 10 ** (i / max(args.trials - 1, 1)):.3g}") for i in range(args.trials)]  # 1e-3 .. 1e-2
    with tempfile.TemporaryDirectory() as tmp:
        sweep_file = os.path.join(tmp, "lrs.py")
        with open(sweep_file, "w") as f:
            f.write(
                "from seqjax import sweeps\n\n\ndef get_sweep():\n"
                f"    return sweeps.Sweep(sweeps.grid('learning_rate', {lrs}), metric='exact_match_greedy', mode='max',"
                f" fixed={fixed!r})\n"
            )
        flags = [f"--config.{k}={v}" for k, v in fixed.items()]
        one = [sys.executable, "-m", "experiments.seq2seq", "--workdir", os.path.join(tmp, "one"), *flags]
        one.append(f"--config.learning_rate={lrs[len(lrs) // 2]}")
        sweep = [sys.executable, "-m", "experiments.sweep", "--experiment", "seq2seq", "--sweep", sweep_file]
        _timed([*one[:4], os.path.join(tmp, "warm"), *one[5:]])  # builds the dataset and warms the file cache
        t_one = _timed(one)
        t_vec = _timed([*sweep, "--workdir", os.path.join(tmp, "vec"), "--vectorize"])
        print(f"seq2seq {args.size} ({fixed}), {args.trials} learning rates {lrs[0]:g}..{lrs[-1]:g}")
        print(f"  one run:                    {t_one:7.1f} s   {_step_ms(os.path.join(tmp, 'one')):7.2f} ms/step")
        vec_step = _step_ms(os.path.join(tmp, "vec", "trial_000"))
        print(f"  vectorised sweep ({args.trials} trials): {t_vec:7.1f} s   {vec_step:7.2f} ms/step (all trials)")
        print(f"  vectorised / one run:       {t_vec / t_one:7.2f}x wall time")
        if args.separate:
            t_sep = _timed([*sweep, "--workdir", os.path.join(tmp, "sep"), "--parallel", "2"])
            print(f"  separate sweep (--parallel 2): {t_sep:7.1f} s = {t_sep / t_one:.2f}x one run; "
                  f"vectorised is {t_sep / t_vec:.2f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
