"""Train a small linear model with optax, letting fcb.ReduceLROnPlateau lower the learning rate.

`optax.inject_hyperparams` keeps the learning rate in the optimizer state, so it can change
between steps without recompiling. After each epoch the validation loss goes to the callback;
its actions say whether, and how, to scale the learning rate, and `fcb.scaled_lr` applies them.

Minibatch SGD on noisy targets stalls at a level set by its learning rate; after a reduction
the validation loss settles lower, until the learning rate reaches `min_lr`.

Run: python examples/reduce_lr_on_plateau_optax.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import fcb

EPOCHS = 30
BATCHES = 16
BATCH_SIZE = 16
FEATURES = 16


def make_data(key: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    k_w, k_x, k_noise, k_xv = jax.random.split(key, 4)
    true_w = jax.random.normal(k_w, (FEATURES,))
    x = jax.random.normal(k_x, (BATCHES * BATCH_SIZE, FEATURES))
    # Noisy targets and small batches: the minibatch gradient noise, and so the level at
    # which the validation loss stalls, grows with the learning rate.
    y = x @ true_w + jax.random.normal(k_noise, (BATCHES * BATCH_SIZE,))
    x_val = jax.random.normal(k_xv, (1024, FEATURES))
    return (x, y), (x_val, x_val @ true_w)


def loss_fn(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x @ w - y) ** 2)


optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)


@jax.jit
def train_epoch(w, opt_state, x, y):
    def step(carry, batch):
        w, opt_state = carry
        grads = jax.grad(loss_fn)(w, *batch)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(w, updates), opt_state), None

    batches = (x.reshape(BATCHES, BATCH_SIZE, -1), y.reshape(BATCHES, BATCH_SIZE))
    (w, opt_state), _ = jax.lax.scan(step, (w, opt_state), batches)
    return w, opt_state


@jax.jit
def end_of_epoch(plateau, plateau_state, opt_state, val_loss, epoch):
    """The callback check and the learning-rate update, compiled once."""
    plateau_state, actions = plateau(plateau_state, {"val_loss": val_loss}, step=epoch)
    lr = opt_state.hyperparams["learning_rate"]
    opt_state.hyperparams["learning_rate"] = fcb.scaled_lr(lr, actions)
    return plateau_state, opt_state, actions.events["reduce_lr_on_plateau/reduced"]


def main() -> None:
    (x, y), (x_val, y_val) = make_data(jax.random.PRNGKey(0))
    w = jnp.zeros(FEATURES)
    opt_state = optimizer.init(w)
    plateau = fcb.ReduceLROnPlateau("val_loss", factor=0.3, patience=2, min_lr=1e-3)
    plateau_state = plateau.init()

    first_loss = float(loss_fn(w, x_val, y_val))
    reductions = 0  # the reductions that changed the rate (not those held at min_lr)
    for epoch in range(EPOCHS):
        perm = jax.random.permutation(jax.random.PRNGKey(epoch + 1), x.shape[0])
        w, opt_state = train_epoch(w, opt_state, x[perm], y[perm])
        val_loss = loss_fn(w, x_val, y_val)
        lr_before = float(opt_state.hyperparams["learning_rate"])
        plateau_state, opt_state, reduced = end_of_epoch(
            plateau, plateau_state, opt_state, val_loss, jnp.asarray(epoch, jnp.int32)
        )
        lr_after = float(opt_state.hyperparams["learning_rate"])
        note = ""
        if reduced:
            note = f"  plateau: lr {lr_before:.2e} -> {lr_after:.2e}"
            if lr_after == lr_before:
                note += " (already at min_lr: not counted)"
            else:
                reductions += 1
        print(f"epoch {epoch:2d}  val_loss {float(val_loss):.3e}{note}")

    final_loss = float(loss_fn(w, x_val, y_val))
    plateaus = int(plateau_state.num_reductions)  # every plateau, at min_lr or not
    print(
        f"val_loss {first_loss:.3f} -> {final_loss:.2e} in {EPOCHS} epochs, "
        f"{reductions} learning-rate reductions ({plateaus} plateaus), final learning rate "
        f"{float(opt_state.hyperparams['learning_rate']):.2e}"
    )
    if reductions == 0 or not final_loss < first_loss:
        raise SystemExit("expected the learning rate to be reduced and the loss to fall")


if __name__ == "__main__":
    main()
