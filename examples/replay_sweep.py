"""Choose early-stopping options after the fact: replay a recorded history under a grid.

Run: python examples/replay_sweep.py  (writes ./replay_sweep.png)

1. Train once, recording the validation loss of every epoch (here a small JAX model,
   trained for a fixed number of epochs with no early stopping).
2. `fcb.grid` builds one batched callback holding every combination of `patience` and
   `min_delta`; `fcb.replay` runs all of them over the history in one compiled call.
3. Read the trade-off: fewer epochs against the best validation loss each run would keep.
"""

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import fcb


def record_history(epochs=120, seed=0):
    """Minibatch SGD on a small, noisy regression: the validation loss falls fast, then
    wanders noisily above its best as the model overfits."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k1, (160, 48))
    y = x @ jax.random.normal(k2, (48,)) + 2.0 * jax.random.normal(k3, (160,))
    (x_train, y_train), (x_val, y_val) = (x[:96], y[:96]), (x[96:], y[96:])

    def loss(w, x, y):
        return jnp.mean((x @ w - y) ** 2)

    @jax.jit
    def epoch(w, key):
        order = jax.random.permutation(key, 96).reshape(-1, 8)

        def step(w, batch):
            return w - 0.02 * jax.grad(loss)(w, x_train[batch], y_train[batch]), None

        w, _ = jax.lax.scan(step, w, order)
        return w, loss(w, x_val, y_val)

    w, val_losses = jnp.zeros(48), []
    for key in jax.random.split(k4, epochs):
        w, val_loss = epoch(w, key)
        val_losses.append(float(val_loss))
    return {"val_loss": np.asarray(val_losses)}


def main() -> None:
    history = record_history()

    def callbacks(patience, min_delta):
        return fcb.chain(
            fcb.EarlyStopping("val_loss", patience=patience, min_delta=min_delta),
            fcb.BestCheckpoint("val_loss", tolerances=(5,)),
        )

    sweep = fcb.grid(callbacks, patience=range(1, 41), min_delta=[0.0, 0.05, 0.2])
    result = fcb.replay(sweep, history)
    print(result.table(max_rows=10, sort_by="best_value"))
    best = result.best()
    print(f"\nbest kept val_loss {best['best_value']:.4f} (epoch {best['best_step']}) with "
          f"patience={best['patience']}, min_delta={best['min_delta']}, "
          f"after {best['checks']} of {len(result.steps)} epochs")
    print("trade-offs (fewer epochs, or a better kept value):")
    for index in result.pareto():
        row = result.row(int(index))
        print(f"  patience={row['patience']:>2} min_delta={row['min_delta']:<5} "
              f"{row['checks']:>4} epochs  val_loss {row['best_value']:.4f}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    patience = np.asarray([c["patience"] for c in result.configs])
    for delta, color in zip([0.0, 0.05, 0.2], ["tab:blue", "tab:orange", "tab:green"]):
        rows = np.asarray([c["min_delta"] == delta for c in result.configs])
        left.plot(patience[rows], result.checks[rows], ".-", color=color,
                  label=f"min_delta = {delta}")
    left.set(xlabel="patience", ylabel="epochs trained before stopping",
             title="When each configuration stops")
    left.grid(alpha=0.3)
    left.legend()

    epochs = np.arange(len(history["val_loss"]))
    right.plot(epochs, history["val_loss"], color="0.3", lw=1.5, label="recorded val_loss")
    for p, color in [(3, "tab:red"), (10, "tab:purple"), (30, "tab:green")]:
        index = next(i for i, c in enumerate(result.configs)
                     if c == {"patience": p, "min_delta": 0.0})
        stop = int(result.stop_step[index])
        right.axvline(stop, color=color, ls="--", label=f"patience {p}: stops at epoch {stop}")
        right.plot(result.best_step[index], result.best_value[index], "o", color=color, ms=8)
    values = history["val_loss"]
    median = float(np.median(values))
    right.set_ylim(values.min() - 0.1, median + 3 * (median - values.min()))  # the first epochs
    right.set(xlabel="epoch", ylabel="val_loss",
              title="Where three patiences stop (dots: the best each keeps)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("replay_sweep.png", dpi=120)
    print("plot: replay_sweep.png")


if __name__ == "__main__":
    main()
