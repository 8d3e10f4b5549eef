"""One Optuna worker of a study shared through SQLite, pruning with fcb.optuna.Pruner.

    python tests/optuna_worker.py STORAGE STUDY WORKER TRIALS SERIES.json
Each trial reports the scripted series of index trial.number (steps 0, 1, ...), records at
which step it was pruned (user attribute `pruned_at`) and which worker ran it.
"""

from __future__ import annotations

import json
import sys

import optuna

import fcb
import fcb.optuna


def main(storage: str, study_name: str, worker: str, trials: int, series_path: str) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with open(series_path) as file:
        config = json.load(file)
    pruner = fcb.optuna.Pruner(fcb.EarlyStopping("value", **config["early_stopping"]))
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        series = config["series"][trial.number]
        for step, value in enumerate(series):
            trial.report(value, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_at", step)
                raise optuna.TrialPruned()
        return series[-1]

    study.optimize(objective, n_trials=trials)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
