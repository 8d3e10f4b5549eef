"""fcb.ray: fcb callbacks as a Ray Tune stopper, and checkpoint reports that follow fcb's slots.

Installed with `pip install fcb[ray]`.

```python
from ray import tune
import fcb, fcb.ray

stopper = fcb.ray.Stopper(fcb.EarlyStopping("val_loss", patience=5))
tuner = tune.Tuner(train, param_space=space, run_config=tune.RunConfig(stop=stopper))
```
"""

from ._checkpoints import Checkpoints as Checkpoints
from ._stopper import Stopper as Stopper

__all__ = ["Checkpoints", "Stopper"]
