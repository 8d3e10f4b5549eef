"""fcb.optuna: fcb callbacks as an Optuna pruner, and the Lightning side of pruning.

Installed with `pip install fcb[optuna]`.

```python
import optuna
import fcb, fcb.optuna

pruner = fcb.optuna.Pruner(fcb.EarlyStopping("value", patience=5, min_delta=1e-3))
study = optuna.create_study(storage="sqlite:///study.db", study_name="sweep",
                            pruner=pruner, load_if_exists=True)
```

[`fcb.optuna.PruningCallback`][] (Lightning, imported on first use) reports a Trainer's
validation metric to a trial and stops every rank together when the trial is pruned.
A finished study replays through [`fcb.replay`][] (`study_name=`), as an
[`fcb.optuna.StudyReplay`][].
"""

from typing import TYPE_CHECKING, Any

from .._replay_study import StudyReplay as StudyReplay
from ._pruner import Pruner as Pruner

if TYPE_CHECKING:  # imported on first use at run time (it needs Lightning and torch)
    from ._lightning import PruningCallback as PruningCallback


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":  # imports Lightning and torch: only when asked for
        from ._lightning import PruningCallback

        return PruningCallback
    raise AttributeError(f"module 'fcb.optuna' has no attribute {name!r}")


__all__ = ["Pruner", "PruningCallback", "StudyReplay"]
