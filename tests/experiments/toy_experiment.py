"""A toy experiment for the sweep tests, with the protocol of experiments/ (TASK, CONFIG, main): the regression task
of tests/training/toy_task.py, a few steps.

    python -m tests.experiments.toy_experiment --workdir DIR [--config FILE] [--config.key=value ...]
"""

import os

from experiments.common import run
from tests.training.toy_task import ToyTask, toy_config

TASK, CONFIG = ToyTask, os.path.abspath(__file__)


def get_config():
    return toy_config(num_train_steps=8, eval_every_steps=4, checkpoint_every_steps=4, log_every_steps=1)


if __name__ == "__main__":
    run(TASK, CONFIG)
