"""A whole training run in one `jax.lax.while_loop`, stopped by the fcb EarlyStopping state.

The chain runs inside the compiled loop body: early stopping ends the loop, the plateau
callback lowers the learning rate, and BestCheckpoint's slots select which weights to carry
as the best overall and per tolerance. One dispatch for the whole run; no host round trip
per epoch. The same run in an eager Python loop stops at the same epoch.

Run: python examples/jax_while_loop.py
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import fcb

MAX_EPOCHS = 200
LR = 0.05


def make_data(key, n=160, features=48):
    """Few samples and many features, so the model overfits and validation loss turns up."""
    k1, k2, k3 = jax.random.split(key, 3)
    w_true = jax.random.normal(k1, (features,))
    x = jax.random.normal(k2, (n, features))
    y = x @ w_true + 2.0 * jax.random.normal(k3, (n,))
    return (x[:96], y[:96]), (x[96:], y[96:])


def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2)


def train_epoch(w, lr, epoch, x, y):
    """One epoch of minibatch SGD (batches of 16); the order depends on the epoch only."""
    key = jax.random.fold_in(jax.random.PRNGKey(1), epoch)
    order = jax.random.permutation(key, x.shape[0]).reshape(-1, 16)

    def sgd_step(w, batch):
        return w - lr * jax.grad(loss_fn)(w, x[batch], y[batch]), None

    w, _ = jax.lax.scan(sgd_step, w, order)
    return w, loss_fn(w, x, y)


def make_callbacks(patience=5):
    return fcb.named_chain(
        stop=fcb.EarlyStopping("val_loss", patience=patience, min_delta=1e-4),
        plateau=fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=2),
        best=fcb.BestCheckpoint("val_loss", tolerances=(1,)),
    )


BEST, TOLERANCE = "best.val_loss", "best.val_loss.tolerance=1"


class Carry(NamedTuple):
    epoch: Any
    w: Any
    lr: Any
    callbacks: Any  # the chain's state
    best: fcb.InMemorySlot  # the weights BestCheckpoint's slots hold
    tolerance: fcb.InMemorySlot
    val_losses: Any


def initial_carry(callbacks, features):
    w = jnp.zeros(features)
    return Carry(
        epoch=jnp.int32(0),
        w=w,
        lr=jnp.float32(LR),
        callbacks=callbacks.init(),
        best=fcb.InMemorySlot(BEST, w),
        tolerance=fcb.InMemorySlot(TOLERANCE, w),
        val_losses=jnp.full((MAX_EPOCHS,), jnp.nan, jnp.float32),
    )


def one_epoch(callbacks, data, carry: Carry) -> tuple[Carry, fcb.Actions]:
    """Train, validate, run the chain; keep the weights a slot takes at this step."""
    (x, y), (x_val, y_val) = data
    w, train_loss = train_epoch(carry.w, carry.lr, carry.epoch, x, y)
    val_loss = loss_fn(w, x_val, y_val)
    metrics = {"val_loss": val_loss, "train_loss": train_loss}
    state, actions = callbacks(carry.callbacks, metrics, step=carry.epoch)
    new = Carry(
        epoch=carry.epoch + 1,
        w=w,
        lr=fcb.scaled_lr(carry.lr, actions),
        callbacks=state,
        best=carry.best.update(actions, w, step=carry.epoch),
        tolerance=carry.tolerance.update(actions, w, step=carry.epoch),
        val_losses=carry.val_losses.at[carry.epoch].set(val_loss),
    )
    return new, actions


def run_compiled(data, patience=5) -> Carry:
    """The whole run: one `lax.while_loop`, ended by `state["stop"].stopped`."""
    callbacks = make_callbacks(patience)

    def keep_going(carry):
        return (carry.epoch < MAX_EPOCHS) & ~carry.callbacks["stop"].stopped

    @jax.jit
    def run(carry):
        return jax.lax.while_loop(keep_going, lambda c: one_epoch(callbacks, data, c)[0], carry)

    return run(initial_carry(callbacks, data[0][0].shape[1]))


def run_eager(data, patience=5) -> Carry:
    """The same run driven from Python, one jitted epoch at a time."""
    callbacks = make_callbacks(patience)
    epoch = jax.jit(lambda c: one_epoch(callbacks, data, c))
    carry = initial_carry(callbacks, data[0][0].shape[1])
    for _ in range(MAX_EPOCHS):
        carry, actions = epoch(carry)
        if bool(actions.stop):
            break
    return carry


def main() -> None:
    data = make_data(jax.random.PRNGKey(0))
    start = time.perf_counter()
    compiled = jax.block_until_ready(run_compiled(data))
    compiled_seconds = time.perf_counter() - start
    eager = run_eager(data)
    stop = compiled.callbacks["stop"]
    print(
        f"compiled while_loop: stopped after epoch {int(stop.stopped_step)} "
        f"({fcb.StopReason(int(stop.stop_reason)).message}); "
        f"{compiled_seconds:.2f} s including compilation"
    )
    print(f"eager loop:          stopped after epoch {int(eager.callbacks['stop'].stopped_step)}")
    best = compiled.callbacks["best"]
    (_, _), (x_val, y_val) = data
    print(
        f"best epoch {int(best.best_step)} (val_loss {float(best.best):.4f}, carried weights "
        f"give {float(loss_fn(compiled.best.value(), x_val, y_val)):.4f}); tolerance-1 best epoch "
        f"{int(best.tolerances.best_step[0])}; final learning rate {float(compiled.lr):.4g}"
    )
    same = int(stop.stopped_step) == int(eager.callbacks["stop"].stopped_step)
    print(f"compiled and eager runs stop at the same epoch: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
