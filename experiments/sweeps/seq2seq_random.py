"""A random search on seq2seq: 8 trials drawing the learning rate log-uniformly, the warm-up and the model's depth;
ranked by the held-out loss.

    python -m experiments.sweep --experiment seq2seq --workdir runs/sweep_random
        --sweep experiments/sweeps/seq2seq_random.py
        --parallel 2

model.num_layers changes the model's shapes: these trials run as separate processes (not --vectorize).
"""

from seqjax import sweeps


def get_sweep():
    return sweeps.Sweep(
        sweeps.random(
            {
                "learning_rate": sweeps.log_uniform(3e-4, 1e-2),
                "warmup_steps": sweeps.int_uniform(0, 100),
                "model.num_layers": sweeps.choice([1, 2, 3]),
            },
            num_trials=8,
            seed=0,
        ),
        metric="eval_loss",
        mode="min",
        fixed={"num_train_steps": 600, "eval_every_steps": 200, "checkpoint_every_steps": 200},
    )
