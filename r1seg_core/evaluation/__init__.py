"""Evaluation: score any checkpoint on a data list with the paper's metrics, tables and plots (`r1seg evaluate`).

cases.py reads data lists and split files (splits.py), questions.py builds the questions, metrics.py scores masks,
run.py runs the resumable, shardable loop and merges, report.py writes the tables and plots.py the figures.
The names below load on first use, so that training can read split files without importing torch and MONAI.
"""

_RUN_NAMES = ("EvaluationSettings", "compare", "evaluate", "merge", "parse_shard")


def __getattr__(name):
    if name in _RUN_NAMES:
        from . import run
        return getattr(run, name)
    raise AttributeError(name)


__all__ = list(_RUN_NAMES)
