"""Train a small regression model in JAX and let fcb decide when to stop and what to keep.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import fcb


def make_data(key, n=160, features=48):
    """Few samples and many features, so the model overfits and validation loss turns up."""
    k1, k2, k3 = jax.random.split(key, 3)
    w_true = jax.random.normal(k1, (features,))
    x = jax.random.normal(k2, (n, features))
    y = x @ w_true + 2.0 * jax.random.normal(k3, (n,))
    return (x[:96], y[:96]), (x[96:], y[96:])


def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2)


@jax.jit
def train_epoch(w, lr, x, y, key):
    """One epoch of minibatch SGD (batches of 16), so the validation loss is noisy."""
    order = jax.random.permutation(key, x.shape[0]).reshape(-1, 16)

    def sgd_step(w, batch):
        return w - lr * jax.grad(loss_fn)(w, x[batch], y[batch]), None

    w, _ = jax.lax.scan(sgd_step, w, order)
    return w, loss_fn(w, x, y)


def main() -> None:
    (x_train, y_train), (x_val, y_val) = make_data(jax.random.PRNGKey(0))
    callbacks = fcb.named_chain(
        stop=fcb.EarlyStopping("val_loss", patience=5, min_delta=1e-4),
        plateau=fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=2),
        top=fcb.ModelCheckpoint("val_loss", save_top_k=2),
        best=fcb.BestCheckpoint("val_loss", tolerances=(2, 5)),
    )
    # One jitted dispatch per validation for the whole chain.
    check = jax.jit(lambda state, metrics, step: callbacks(state, metrics, step=step))
    state = callbacks.init()
    w, lr = jnp.zeros(x_train.shape[1]), jnp.float32(0.01)
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    for epoch in range(200):
        w, train_loss = train_epoch(w, lr, x_train, y_train, keys[epoch])
        val_loss = loss_fn(w, x_val, y_val)
        metrics = {"val_loss": val_loss, "train_loss": train_loss}
        state, actions = check(state, metrics, jnp.int32(epoch))
        lr = fcb.scaled_lr(lr, actions)
        if actions.stop:
            print(f"stopped after epoch {epoch}: {actions.stop_message()}")
            break
    print(f"final val_loss {float(val_loss):.4f}, learning rate {float(lr):.4g}")
    print(f"{'slot':<28}{'step':>6}{'val_loss':>12}")
    for slot, step in sorted(actions.slots.items()):
        value = float(actions.slot_values[slot])
        print(f"{slot:<28}{int(step):>6}{value:>12.5f}")
    saved = fcb.state_dict(state, callbacks)
    restored = fcb.load_state_dict(callbacks, saved)
    same = jax.tree_util.tree_all(
        jax.tree_util.tree_map(
            lambda a, b: bool(np.array_equal(a, b, equal_nan=True)), state, restored
        )
    )
    print(f"state_dict round trip exact: {same}")


if __name__ == "__main__":
    main()
