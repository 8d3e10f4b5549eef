"""A small deterministic JAX training run driven by fcb.orbax (used by tests and kill tests).

Run as a script, it trains into a directory and prints one JSON line per check:
    python tests/orbax_training.py DIR [--resume] [--epochs N] [--sync] [--hidden H]
"""

from __future__ import annotations

import argparse
import json
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fcb
import fcb.orbax


def callbacks(tolerances=(1, 3), top_k=2):
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=8),
        fcb.ModelCheckpoint("val_loss", save_top_k=top_k, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=tolerances),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=2),
    )


def data():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1234), 3)
    x = jax.random.normal(k1, (96, 12))
    w = jax.random.normal(k2, (12, 1))
    y = x @ w + 1.5 * jax.random.normal(k3, (96, 1))
    return (x[:48], y[:48]), (x[48:], y[48:])


OPTIMIZER = optax.inject_hyperparams(optax.sgd)(learning_rate=0.005, momentum=0.9)


def model_and_opt_state(hidden=32):
    model = eqx.nn.MLP(12, 1, hidden, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    # a wide hidden layer (the kill test's large checkpoints) diverges at the base rate
    lr = jnp.asarray(0.005 * min(1.0, (32 / hidden) ** 0.5), jnp.float32)
    return model, opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


@eqx.filter_jit
def train_epoch(model, opt_state, epoch, x, y):
    """One epoch of minibatch SGD; the batch order depends on the epoch only, so a resumed
    run needs no saved random state."""
    key = jax.random.fold_in(jax.random.PRNGKey(7), epoch)
    batches = jax.random.permutation(key, x.shape[0]).reshape(-1, 8)
    params, static = eqx.partition(model, eqx.is_array)

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(eqx.combine(p, static), x[batch], y[batch])
        )(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
    return eqx.combine(params, static), opt_state, losses[-1]


def with_lr(opt_state, actions):
    lr = opt_state.hyperparams["learning_rate"]
    hyperparams = {**opt_state.hyperparams, "learning_rate": fcb.scaled_lr(lr, actions)}
    return opt_state._replace(hyperparams=hyperparams)


def after_check(model, opt_state):
    """The state a checkpoint holds: the one training continues from after the check, with
    the check's learning-rate change applied (a resumed run must not use the old rate)."""
    params = eqx.filter(model, eqx.is_array)
    return lambda actions: {"model": params, "opt_state": with_lr(opt_state, actions)}


def train(
    dirpath,
    *,
    epochs=40,
    chain=None,
    resume=False,
    async_save=True,
    stop_after=None,
    on_check=None,
    hidden=32,
):
    """Train; return the per-check decisions and the final model arrays.

    `stop_after=k` abandons the run after the check of epoch k, closing nothing cleanly but
    what a crash would release (the save in flight and the directory lock).
    """
    (x, y), (x_val, y_val) = data()
    model, opt_state = model_and_opt_state(hidden)
    adapter = fcb.orbax.OrbaxAdapter(
        chain or callbacks(),
        dirpath,
        resume_from=dirpath if resume else None,
        background=async_save,
    )
    template = {"model": eqx.filter(model, eqx.is_array), "opt_state": opt_state}
    adapter.on_fit_start(like=template)
    start = 0
    if adapter.resumed_step is not None:
        start = adapter.resumed_step + 1
        restored = adapter.restored_state
        model = eqx.combine(restored["model"], eqx.filter(model, eqx.is_array, inverse=True))
        opt_state = restored["opt_state"]
    decisions = []
    if adapter.should_stop:  # resumed a run that had already stopped: nothing to train
        epochs = start
    for epoch in range(start, epochs):
        model, opt_state, train_loss = train_epoch(model, opt_state, jnp.int32(epoch), x, y)
        val_loss = loss_fn(model, x_val, y_val)
        actions = adapter.on_validation_end(
            {"val_loss": val_loss, "train_loss": train_loss},
            step=epoch,
            state=after_check(model, opt_state),
        )
        opt_state = with_lr(opt_state, actions)
        decision = {
            "step": epoch,
            "stop": bool(actions.stop),
            "lr": float(opt_state.hyperparams["learning_rate"]),
            "slots": {k: int(v) for k, v in actions.slots.items()},
        }
        decisions.append(decision)
        if on_check is not None:
            on_check(decision)
        if stop_after is not None and epoch >= stop_after:
            adapter.on_exception()
            return decisions, eqx.filter(model, eqx.is_array)
        if adapter.should_stop:
            break
    adapter.on_fit_end()
    return decisions, eqx.filter(model, eqx.is_array)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument(
        "--wait", action="store_true", help="start training when a line arrives on stdin"
    )
    args = parser.parse_args(argv)
    if args.wait:  # lets a test start the (slow) imports while it is busy elsewhere
        sys.stdin.readline()

    def emit(decision):
        print(json.dumps(decision), flush=True)

    _, params = train(
        args.dirpath,
        epochs=args.epochs,
        resume=args.resume,
        async_save=not args.sync,
        on_check=emit,
        hidden=args.hidden,
    )
    leaves = {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(params))}
    np.savez(f"{args.dirpath}/final_weights.npz", **leaves)
    print(json.dumps({"done": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
