"""Costs of fcb.orbax, in one process.

1. Save time: N saves of the same pytree (an MLP's arrays and its Adam state) through
   `fcb.orbax.OrbaxAdapter` (each check a new best: one save, the previous step deleted) vs
   direct `CheckpointManager.save` + `wait_until_finished` (`max_to_keep=1`: one save, one
   deletion). Each timed save ends when the step is committed (`adapter.wait()`). Both sides
   get the same jax.Array pytree and the same options (async or not, waited for). The two
   sides' saves alternate (fcb first at odd saves, direct first at even ones), each with its
   own directory, so both see the same load on a shared machine; the ratio is the median of
   the per-pair ratios, with the middle half of them.
2. The callbacks inside a compiled loop: E epochs in one `lax.scan`, with a chain of four
   callbacks (and the best weights carried by their slots) vs the same loop without them.

Run: python benchmarks/orbax_save.py [--saves N] [--epochs E] [--width W]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

import fcb
import fcb.orbax


def state_pytree(width):
    model = eqx.nn.MLP(64, 64, width, depth=2, key=jax.random.PRNGKey(0))
    params = eqx.filter(model, eqx.is_array)
    return {"model": params, "opt_state": optax.adam(1e-3).init(params)}


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


class FcbSaver:
    def __init__(self, state, async_save):
        callbacks = fcb.ModelCheckpoint("val_loss", save_top_k=1, save_last=True)
        self.state = state
        self.adapter = fcb.orbax.OrbaxAdapter(callbacks, tempfile.mkdtemp(), background=async_save)
        self.adapter.on_fit_start()

    def save(self, step):
        self.adapter.on_validation_end({"val_loss": 1.0 / (step + 1)}, step=step, state=self.state)
        self.adapter.wait()

    def close(self):
        self.adapter.on_fit_end()


class DirectSaver:
    def __init__(self, state, async_save):
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=async_save)
        self.state = state
        self.manager = ocp.CheckpointManager(tempfile.mkdtemp(), options=options)

    def save(self, step):
        self.manager.save(step, args=ocp.args.StandardSave(self.state))
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def time_saves(state, saves, async_save):
    """Per-save times of fcb.orbax and of direct orbax, interleaved; step 0 (and the chain's
    compilation) is a warm-up on both sides."""
    savers = {"fcb": FcbSaver(state, async_save), "direct": DirectSaver(state, async_save)}
    times = {name: [] for name in savers}
    try:
        for step in range(saves + 1):
            order = ("fcb", "direct") if step % 2 else ("direct", "fcb")
            for name in order:
                start = time.perf_counter()
                savers[name].save(step)
                if step:
                    times[name].append(time.perf_counter() - start)
    finally:
        for saver in savers.values():
            saver.close()
    return times["fcb"], times["direct"]


def middle_half(values):
    values = sorted(values)
    return values[len(values) // 4], values[(3 * len(values) - 1) // 4]


def make_data(key, n=160, features=48):
    k1, k2, k3 = jax.random.split(key, 3)
    w_true = jax.random.normal(k1, (features,))
    x = jax.random.normal(k2, (n, features))
    y = x @ w_true + 2.0 * jax.random.normal(k3, (n,))
    return (x[:96], y[:96]), (x[96:], y[96:])


def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2)


def train_epoch(w, lr, epoch, x, y):
    key = jax.random.fold_in(jax.random.PRNGKey(1), epoch)
    order = jax.random.permutation(key, x.shape[0]).reshape(-1, 16)

    def sgd_step(w, batch):
        return w - lr * jax.grad(loss_fn)(w, x[batch], y[batch]), None

    w, _ = jax.lax.scan(sgd_step, w, order)
    return w, loss_fn(w, x, y)


def compiled_loops(epochs, data):
    (x, y), (x_val, y_val) = data
    callbacks = fcb.named_chain(
        stop=fcb.EarlyStopping("val_loss", patience=10**6),  # never stops: equal work
        plateau=fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=2),
        top=fcb.ModelCheckpoint("val_loss", save_top_k=2),
        best=fcb.BestCheckpoint("val_loss", tolerances=(1, 3)),
    )

    def with_callbacks(carry, epoch):
        w, lr, state, best_w = carry
        w, train_loss = train_epoch(w, lr, epoch, x, y)
        metrics = {"val_loss": loss_fn(w, x_val, y_val), "train_loss": train_loss}
        state, actions = callbacks(state, metrics, step=epoch)
        best_w = jnp.where(actions.slots["best_model"] == epoch, w, best_w)
        return (w, fcb.scaled_lr(lr, actions), state, best_w), actions.stop

    def without_callbacks(carry, epoch):
        w, lr = carry
        w, train_loss = train_epoch(w, lr, epoch, x, y)
        return (w, lr), (loss_fn(w, x_val, y_val), train_loss)

    w0, lr0 = jnp.zeros(x.shape[1]), jnp.float32(0.01)
    steps = jnp.arange(epochs, dtype=jnp.int32)
    run_with = jax.jit(lambda: jax.lax.scan(with_callbacks, (w0, lr0, callbacks.init(), w0), steps))
    run_without = jax.jit(lambda: jax.lax.scan(without_callbacks, (w0, lr0), steps))
    return run_with, run_without


def best_of(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--saves", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(
        f"# fcb.orbax costs, {datetime.date.today()}, {platform.machine()}, "
        f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, "
        f"device {jax.devices()[0].platform}"
    )

    state = state_pytree(args.width)
    print(f"\n## 1. save time: {args.saves} saves of one pytree ({nbytes(state) / 2**20:.2f} MiB)")
    print(
        f"{'mode':<8}{'fcb.orbax median':>18}{'direct median':>16}{'ratio':>8}"
        "   (median of per-pair ratios)"
    )
    for async_save in (True, False):
        through_fcb, direct = time_saves(state, args.saves, async_save)
        ratios = [ours / theirs for ours, theirs in zip(through_fcb, direct)]
        low, high = middle_half(ratios)
        mode = "async" if async_save else "sync"
        print(
            f"{mode:<8}{statistics.median(through_fcb) * 1e3:>15.1f} ms"
            f"{statistics.median(direct) * 1e3:>13.1f} ms{statistics.median(ratios):>8.2f}"
            f"   (middle half of the per-pair ratios {low:.2f}-{high:.2f})"
        )

    run_with, run_without = compiled_loops(args.epochs, make_data(jax.random.PRNGKey(0)))
    with_best, with_median = best_of(run_with, args.repeats)
    without_best, without_median = best_of(run_without, args.repeats)
    # best of the repeats: the least disturbed by other load on the machine
    per_check = (with_best - without_best) / args.epochs
    print(
        f"\n## 2. compiled loop: {args.epochs} epochs in one lax.scan (48 features, 6 SGD "
        f"steps per epoch), best and median of {args.repeats} runs"
    )
    print(f"{'':<20}{'best':>10}{'median':>10}")
    print(f"{'with callbacks':<20}{with_best * 1e3:>8.1f}ms{with_median * 1e3:>8.1f}ms")
    print(f"{'without callbacks':<20}{without_best * 1e3:>8.1f}ms{without_median * 1e3:>8.1f}ms")
    print(
        f"ratio (best) {with_best / without_best:.2f}; ratio (median) "
        f"{with_median / without_median:.2f}; callbacks cost {per_check * 1e6:.1f} us per check"
    )


if __name__ == "__main__":
    main()
