"""A training loop with long epochs, for the preemption tests: one check per epoch,
`on_train_batch_end` after every other batch, one line per batch on stdout.

    python tests/preemption_training.py DIR torch|orbax [--epochs N] [--batches B]

Each batch's data comes from its global step, so a resumed run trains exactly as an
uninterrupted one; the last stdout line is JSON: resumed step, stop, final weights.
"""

import argparse
import json
import sys
import time

import numpy as np

import fcb

BATCH_SECONDS = 0.01


def callbacks():
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=100),
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
    )


def data(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    return x, x @ np.arange(1, 5, dtype=np.float32)[:, None] + 0.5


def run_torch(dirpath, epochs, batches):
    import torch

    import fcb.torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    adapter = fcb.torch.TorchAdapter(callbacks(), model=model, optimizer=optimizer,
                                     dirpath=dirpath)
    adapter.on_fit_start()

    def train(step):
        x, y = (torch.from_numpy(a) for a in data(step))
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    loop(adapter, train, epochs, batches, lambda: None)
    return adapter, [p.detach().numpy().ravel().tolist() for p in model.parameters()]


def run_orbax(dirpath, epochs, batches):
    import jax
    import jax.numpy as jnp

    import fcb.orbax

    adapter = fcb.orbax.OrbaxAdapter(callbacks(), dirpath, background=False)
    params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros((1,))}
    adapter.on_fit_start(like=params)
    if adapter.restored_state is not None:
        params = adapter.restored_state

    @jax.jit
    def update(params, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
        )(params)
        return jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads), loss

    box = {"params": params}

    def train(step):
        box["params"], loss = update(box["params"], *data(step))
        return float(loss)

    loop(adapter, train, epochs, batches, lambda: box["params"])
    return adapter, [np.asarray(box["params"][k]).ravel().tolist() for k in ("w", "b")]


def loop(adapter, train, epochs, batches, state):
    start = 0 if adapter.resumed_step is None else adapter.resumed_step + 1
    for step in range(start, epochs * batches):
        loss = train(step)
        time.sleep(BATCH_SECONDS)
        print(f"batch {step}", flush=True)
        if (step + 1) % batches == 0:
            adapter.on_validation_end({"val_loss": loss}, step=step, **_state(adapter, state))
        else:
            adapter.on_train_batch_end(step=step, **_state(adapter, state))
        if adapter.should_stop:
            break


def _state(adapter, state):
    return {"state": state()} if type(adapter).__name__ == "OrbaxAdapter" else {}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("framework", choices=["torch", "orbax"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args(argv)
    run = run_torch if args.framework == "torch" else run_orbax
    adapter, weights = run(args.dirpath, args.epochs, args.batches)
    resumed, stopped, message = adapter.resumed_step, adapter.should_stop, adapter.stop_message
    adapter.on_fit_end()
    print(json.dumps({"resumed": resumed, "stopped": stopped, "message": message,
                      "weights": weights}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
