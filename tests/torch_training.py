"""A small deterministic Torch training run driven by fcb.torch (used by tests and kill tests).

Run as a script, it trains into a directory and prints one JSON line per check:
    python tests/torch_training.py DIR [--resume] [--epochs N] [--background] [--hidden H]
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import numpy as np
import torch

import fcb
import fcb.torch


def callbacks(tolerances=(1, 3), top_k=2):
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=8),
        fcb.ModelCheckpoint("val_loss", save_top_k=top_k, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=tolerances),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=2),
    )


def data():
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 12, generator=generator)
    w = torch.randn(12, 1, generator=generator)
    y = x @ w + 1.5 * torch.randn(96, 1, generator=generator)
    return (x[:48], y[:48]), (x[48:], y[48:])


def model_and_optimizer(hidden=32):
    # every generator a checkpoint records is seeded, so runs in different processes write
    # the same bytes (checkpoints hold torch's, NumPy's and Python's RNG states)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    # the step size shrinks with the width, so a wide model (the kill test's ~1 MB
    # checkpoints) trains for as many checks as a narrow one instead of diverging at once
    lr = 0.005 * min(1.0, 32 / hidden)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train(
    dirpath,
    *,
    epochs=40,
    chain=None,
    resume=False,
    background=False,
    stop_after=None,
    on_check=None,
    hidden=32,
):
    """Train; return the per-check decisions and the final weights.

    `stop_after=k` abandons the run after the check of epoch k without closing anything
    cleanly but the directory lock (as a crash would release it).
    """
    (x, y), (x_val, y_val) = data()
    model, optimizer = model_and_optimizer(hidden)
    adapter = fcb.torch.TorchAdapter(
        chain or callbacks(),
        model=model,
        optimizer=optimizer,
        dirpath=dirpath,
        background=background,
        resume_from=dirpath if resume else None,
    )
    adapter.on_fit_start()
    start = adapter.resumed_step + 1 if adapter.resumed_step is not None else 0
    decisions = []
    if adapter.should_stop:  # resumed a run that had already stopped: nothing to train
        epochs = start
    for epoch in range(start, epochs):
        model.train()
        for batch in torch.randperm(48).split(8):  # the RNG state matters for resume
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = torch.nn.functional.mse_loss(model(x_val), y_val)
        actions = adapter.on_validation_end({"val_loss": val_loss, "train_loss": loss}, step=epoch)
        decision = {
            "step": epoch,
            "stop": bool(actions.stop),
            "lr": optimizer.param_groups[0]["lr"],
            "slots": {k: int(v) for k, v in actions.slots.items()},
        }
        decisions.append(decision)
        if on_check is not None:
            on_check(decision)
        if stop_after is not None and epoch >= stop_after:
            adapter.on_exception()
            return decisions, model.state_dict()
        if adapter.should_stop:
            break
    adapter.on_fit_end()
    return decisions, model.state_dict()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args(argv)

    def emit(decision):
        print(json.dumps(decision), flush=True)

    _, state = train(
        args.dirpath,
        epochs=args.epochs,
        resume=args.resume,
        background=args.background,
        on_check=emit,
        hidden=args.hidden,
    )
    torch.save(state, f"{args.dirpath}/final_weights.pt")
    print(json.dumps({"done": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
