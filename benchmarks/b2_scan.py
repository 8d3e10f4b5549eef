"""B2: fcb callbacks inside a compiled JAX training loop, against the same loop without them.

A small MLP (32 -> 128 -> 128 -> 1, tanh) trained with minibatch SGD for 1,000 steps in one
`jax.lax.scan`, compiled once. The callback loop runs `fcb.chain(EarlyStopping,
ModelCheckpoint(top-1, last), ReduceLROnPlateau)` on the minibatch loss at every step (the
most frequent check a loop can make), multiplies the learning rate by the chain's
`lr_scale` (`fcb.scaled_lr`) and freezes the parameters once the chain asks to stop. The
baseline is the same scan without the chain. Both are timed warm (compiled), alternately.

B2b also keeps the best parameters in the loop carry (the in-memory checkpoint a compiled
loop would hold), as `fcb.InMemorySlot` does: one vector per dtype, copied when the
`best_model` slot takes the current step. B2bs keeps them as a select over every parameter
array at every step instead, to show what that costs.

B2, B2b and B2bs carry the chain's state as `fcb.packed` does (one vector per dtype: the
way to run callbacks in a compiled loop); B2u and B2bu carry it leaf by leaf, as `chain()`
returns it (B2bu also selects every array), to show what packing saves. All six loops are
timed in one interleaved run, and every loop that keeps the best parameters must end with
the same ones.

Run: python benchmarks/b2_scan.py [--quick]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, cli, interleaved, median, ms, ratios, spread, timed

import fcb

FEATURES, HIDDEN, BATCH, BATCHES = 32, 128, 128, 8


def init_params(key: jax.Array) -> tuple[jax.Array, ...]:
    k1, k2, k3 = jax.random.split(key, 3)
    return (
        jax.random.normal(k1, (FEATURES, HIDDEN)) / FEATURES**0.5,
        jnp.zeros(HIDDEN),
        jax.random.normal(k2, (HIDDEN, HIDDEN)) / HIDDEN**0.5,
        jnp.zeros(HIDDEN),
        jax.random.normal(k3, (HIDDEN, 1)) / HIDDEN**0.5,
        jnp.zeros(1),
    )


def data(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    kx, kw, kn = jax.random.split(key, 3)
    x = jax.random.normal(kx, (BATCHES, BATCH, FEATURES))
    y = jnp.tanh(x @ jax.random.normal(kw, (FEATURES, 1))) + 0.1 * jax.random.normal(
        kn, (BATCHES, BATCH, 1)
    )
    return x, y


def loss_fn(params: tuple[jax.Array, ...], x: jax.Array, y: jax.Array) -> jax.Array:
    w1, b1, w2, b2, w3, b3 = params
    h = jnp.tanh(x @ w1 + b1)
    h = jnp.tanh(h @ w2 + b2)
    return jnp.mean((h @ w3 + b3 - y) ** 2)


def chain() -> fcb.Callback:
    return fcb.chain(
        fcb.EarlyStopping("loss", patience=200),
        fcb.ModelCheckpoint("loss", save_top_k=1, save_last=True),
        fcb.ReduceLROnPlateau("loss", factor=0.5, patience=50),
    )


def baseline_loop(steps: int) -> Callable[..., Any]:
    def train(params: Any, x: jax.Array, y: jax.Array) -> Any:
        def step(carry: Any, i: jax.Array) -> Any:
            params, lr = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x[i % BATCHES], y[i % BATCHES])
            params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
            return (params, lr), loss

        (params, _), losses = jax.lax.scan(step, (params, jnp.float32(0.05)), jnp.arange(steps))
        return params, losses

    return jax.jit(train)


def callback_loop(steps: int, callbacks: fcb.Callback, keep_best: str) -> Callable[..., Any]:
    """`keep_best`: "" (not kept), "slot" (`fcb.InMemorySlot`), "select" (every array)."""

    def train(params: Any, x: jax.Array, y: jax.Array) -> Any:
        def step(carry: Any, i: jax.Array) -> Any:
            params, lr, state, stopped, best = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x[i % BATCHES], y[i % BATCHES])
            state, actions = callbacks(state, {"loss": loss}, step=i)
            # the parameters that produced the best loss so far
            if keep_best == "slot":
                best = best.update(actions, params, step=i)
            elif keep_best == "select":
                is_best = actions.slots["best_model"] == i
                best = jax.tree_util.tree_map(lambda b, p: jnp.where(is_best, p, b), best, params)
            step_lr = jnp.where(stopped, 0.0, lr)
            params = jax.tree_util.tree_map(lambda p, g: p - step_lr * g, params, grads)
            lr = fcb.scaled_lr(lr, actions)
            return (params, lr, state, stopped | actions.stop, best), loss

        best = fcb.InMemorySlot("best_model", params) if keep_best == "slot" else params
        carry = (params, jnp.float32(0.05), callbacks.init(), jnp.asarray(False), best)
        (params, _, _, stopped, best), losses = jax.lax.scan(step, carry, jnp.arange(steps))
        return params, losses, stopped, best.value() if keep_best == "slot" else best

    return jax.jit(train)


VARIANTS = {
    # row id: (how the best parameters are kept in the carry, carry the chain's state packed)
    "B2": ("", True),
    "B2b": ("slot", True),
    "B2bs": ("select", True),
    "B2u": ("", False),
    "B2bu": ("select", False),
}
TARGETS = {"B2": 1.02, "B2b": 1.05}
KEPT = {"slot": ", best parameters kept in the carry by fcb.InMemorySlot",
        "select": ", best parameters kept in the carry by a select of every array"}


def run(quick: bool = False) -> list[Row]:
    steps, repeats = (20, 2) if quick else (1000, 31)
    params = init_params(jax.random.PRNGKey(0))
    x, y = data(jax.random.PRNGKey(1))
    loops = {
        row: callback_loop(steps, fcb.packed(chain()) if packed else chain(), keep_best)
        for row, (keep_best, packed) in VARIANTS.items()
    }
    loops["peer"] = baseline_loop(steps)
    # Packing, and how the best parameters are kept, change how the carry is laid out, not
    # one decision or parameter.
    for kept in (False, True):
        a, *others = (loops[row] for row, v in VARIANTS.items() if bool(v[0]) == kept)
        for b in others:
            same = jax.tree_util.tree_map(jnp.array_equal, a(params, x, y), b(params, x, y))
            assert all(jax.tree_util.tree_leaves(same)), "the loops' results differ"
    times = interleaved(
        {
            name: (lambda loop=loop: timed(lambda: jax.block_until_ready(loop(params, x, y))))
            for name, loop in loops.items()
        },
        repeats=repeats,
        warmup=1,
    )
    rows = []
    for row, (keep_best, packed) in VARIANTS.items():
        per_repeat = ratios(times[row], times["peer"])
        ratio = median(per_repeat)
        target = TARGETS.get(row)
        what = (
            "EarlyStopping + ModelCheckpoint + ReduceLROnPlateau checked at every step inside a "
            f"jitted lax.scan (MLP {FEATURES}-{HIDDEN}-{HIDDEN}-1, batch {BATCH}, {steps} steps)"
            + KEPT.get(keep_best, "")
            + (", state carried by fcb.packed" if packed else ", state carried leaf by leaf")
        )
        rows.append(
            Row(
                id=row,
                what=what,
                fcb=ms(median(times[row])),
                peer=ms(median(times["peer"])),
                ratio=ratio,
                target=f"<= {target:.2f}x" if target else "",
                met=ratio <= target if target else None,
                note=f"{repeats} repeats, {spread(per_repeat)}",
            )
        )
    return rows


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
