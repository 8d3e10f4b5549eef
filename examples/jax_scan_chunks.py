"""Training in compiled chunks of K epochs (`lax.scan`), checkpoints applied between chunks.

Each chunk runs K epochs and K checks of the fcb chain inside one compiled call and returns,
for every check, the actions, the callbacks' state and the state training continues from.
Between chunks, `fcb.orbax.OrbaxAdapter.apply_actions` writes what the slots keep (with
orbax), records the manifest and sets the stop flag. Once the chain stops, the rest of the
chunk idles. The result is the run an eager loop gives: same stop, same checkpoints.
A SIGTERM received while a chunk runs (a preemption) is seen between chunks, at the first
of its checks: that check becomes the resume point and the loop ends; the same command,
launched again, resumes there.

Run: python examples/jax_scan_chunks.py
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import fcb
import fcb.orbax

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
        top=fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        best=fcb.BestCheckpoint("val_loss", tolerances=(1,)),
    )


class Carry(NamedTuple):
    epoch: Any
    w: Any
    lr: Any
    callbacks: Any


class Check(NamedTuple):
    """What one check inside a chunk hands to the host."""

    ran: Any  # False for the idle epochs after a stop
    step: Any
    metrics: Any
    actions: fcb.Actions
    callbacks: Any  # the chain's state after the check
    state: Any  # what a checkpoint of this step holds: training continues from it


def epoch_and_check(callbacks, data, carry: Carry) -> tuple[Carry, Check]:
    (x, y), (x_val, y_val) = data
    w, train_loss = train_epoch(carry.w, carry.lr, carry.epoch, x, y)
    metrics = {"val_loss": loss_fn(w, x_val, y_val), "train_loss": train_loss}
    state, actions = callbacks(carry.callbacks, metrics, step=carry.epoch)
    lr = fcb.scaled_lr(carry.lr, actions)
    new = Carry(epoch=carry.epoch + 1, w=w, lr=lr, callbacks=state)
    return new, Check(jnp.bool_(True), carry.epoch, metrics, actions, state, {"w": w, "lr": lr})


def make_chunk(callbacks, data, k):
    """K epochs and checks in one compiled call; idle once the chain has stopped."""

    def body(carry: Carry, _):
        ran = (carry.epoch < MAX_EPOCHS) & ~carry.callbacks["stop"].stopped
        new, check = epoch_and_check(callbacks, data, carry)
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(ran, n, o), new, carry)
        return new, check._replace(ran=ran)

    return jax.jit(lambda carry: jax.lax.scan(body, carry, None, length=k))


def initial_carry(callbacks, features):
    return Carry(jnp.int32(0), jnp.zeros(features), jnp.float32(LR), callbacks.init())


def run_chunked(data, directory, k=8, patience=5) -> tuple[fcb.orbax.OrbaxAdapter, int]:
    callbacks = make_callbacks(patience)
    chunk = make_chunk(callbacks, data, k)
    adapter = fcb.orbax.OrbaxAdapter(callbacks, directory)
    adapter.on_fit_start()
    carry = initial_carry(callbacks, data[0][0].shape[1])
    chunks = 0
    while not adapter.should_stop and int(carry.epoch) < MAX_EPOCHS:
        carry, checks = chunk(carry)
        chunks += 1
        checks = jax.device_get(checks)
        for i in range(k):
            check = jax.tree_util.tree_map(lambda x, i=i: x[i], checks)
            if not check.ran:
                break
            adapter.apply_actions(
                check.actions,
                step=check.step,
                callbacks_state=check.callbacks,
                state=check.state,
                metrics=check.metrics,
            )
            if adapter.should_stop:  # a stop, or a preemption signal received meanwhile:
                break  # the run resumes from this check; the chunk's later ones are redone
    adapter.on_fit_end()
    return adapter, chunks


def run_eager(data, directory, patience=5) -> fcb.orbax.OrbaxAdapter:
    """The same run with one `on_validation_end` per epoch."""
    callbacks = make_callbacks(patience)
    epoch = jax.jit(lambda carry: epoch_and_check(callbacks, data, carry))
    adapter = fcb.orbax.OrbaxAdapter(callbacks, directory)
    adapter.on_fit_start()
    carry = initial_carry(callbacks, data[0][0].shape[1])
    for _ in range(MAX_EPOCHS):
        new, check = epoch(carry)
        adapter.on_validation_end(
            check.metrics,
            step=int(carry.epoch),
            state=lambda actions, c=carry, w=new.w: {"w": w, "lr": fcb.scaled_lr(c.lr, actions)},
        )
        carry = new
        if adapter.should_stop:
            break
    adapter.on_fit_end()
    return adapter


def main() -> None:
    data = make_data(jax.random.PRNGKey(0))
    chunked_dir, eager_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    start = time.perf_counter()
    chunked, chunks = run_chunked(data, chunked_dir, k=8)
    seconds = time.perf_counter() - start
    run_eager(data, eager_dir)
    chunked_slots = fcb.orbax.read_manifest(chunked_dir)["slots"]
    eager_slots = fcb.orbax.read_manifest(eager_dir)["slots"]
    last = chunked_slots["last"]["step"]
    print(
        f"chunked run: {chunks} chunks of 8 epochs, stopped after epoch {last}: "
        f"{chunked.stop_message} ({seconds:.2f} s)"
    )
    print(f"eager run:   stopped after epoch {eager_slots['last']['step']}")
    print(f"{'slot':<28}{'step':>6}{'val_loss':>12}")
    for name, slot in sorted(chunked_slots.items()):
        print(f"{name:<28}{slot['step']:>6}{slot['value']:>12.5f}")
    best = fcb.orbax.restore(chunked_dir, "best_model", like={"w": jnp.zeros(48), "lr": 0.0})
    (_, _), (x_val, y_val) = data
    print(f"restored best_model: val_loss {float(loss_fn(best['w'], x_val, y_val)):.5f}")
    same = chunked_slots == eager_slots
    print(f"chunked and eager runs keep the same checkpoints: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
