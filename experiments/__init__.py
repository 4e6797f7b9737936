"""Experiment entry points: `python -m experiments.NAME --workdir DIR [--config FILE] [--config.key=value ...]`.

Each module's `main()` calls `experiments.common.run`, which on a CPU-only host first restarts the process with
glibc's huge-page tunable (`seqjax.runtime.restart_with_hugepages_on_cpu`; `SEQJAX_HUGEPAGES=0` opts out) and logs
what it did; `experiments.sweep` makes the same call. Importing these modules changes nothing.
"""
