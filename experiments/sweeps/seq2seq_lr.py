"""Learning rate x label smoothing on the default seq2seq task (reversal), 3 x 2 trials of 600 steps; ranked by the
held-out loss (all six reach exact match 1.0 on this easy task, which results.md also shows).

    python -m experiments.sweep --experiment seq2seq --workdir runs/sweep_seq2seq
        --sweep experiments/sweeps/seq2seq_lr.py
        [--parallel 2 | --vectorize]

Both keys leave the program unchanged, so --vectorize trains all six in one program.
"""

from seqjax import sweeps


def get_sweep():
    return sweeps.Sweep(
        sweeps.grid({"learning_rate": [1e-3, 3e-3, 1e-2], "label_smoothing": [0.0, 0.1]}),
        metric="eval_loss",
        mode="min",
        fixed={"num_train_steps": 600, "eval_every_steps": 200, "checkpoint_every_steps": 200},
    )
