"""A plain PyTorch training loop driven by fcb: stop, checkpoint, reduce the learning rate.

Run: python examples/torch_loop.py  (writes ./runs/torch_loop)

The callbacks are pure; `fcb.torch.TorchAdapter` applies their actions to the loop: it
flips `should_stop`, writes each checkpointed step once (atomically) with a stable name per
slot, scales the optimizer's learning rate, and records every check in `history.jsonl`.
"""

import os
import shutil

import torch

import fcb
import fcb.torch


def make_data(n_train=256, n_val=512, features=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, features, generator=generator)
    w = torch.randn(features, 1, generator=generator) / features**0.5
    y = x @ w + 0.5 * torch.sin(3 * x[:, :1]) + 0.5 * torch.randn(len(x), 1, generator=generator)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def main() -> None:
    torch.manual_seed(0)
    (x, y), (x_val, y_val) = make_data()
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    callbacks = fcb.chain(
        fcb.EarlyStopping("val_loss", patience=5, min_delta=1e-3),
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        fcb.BestCheckpoint("val_loss", tolerances=(2, 4)),
        fcb.ReduceLROnPlateau("val_loss", factor=0.5, patience=2),
    )
    run_dir = os.path.join("runs", "torch_loop")
    shutil.rmtree(run_dir, ignore_errors=True)  # an example starts fresh every time
    adapter = fcb.torch.TorchAdapter(
        callbacks, model=model, optimizer=optimizer, dirpath=run_dir, history=True
    )
    with adapter:  # on_fit_start / on_fit_end (on_exception if the loop raises)
        for epoch in range(60):
            model.train()
            for batch in torch.randperm(len(x)).split(32):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                val_loss = torch.nn.functional.mse_loss(model(x_val), y_val)
            adapter.on_validation_end({"val_loss": val_loss, "train_loss": loss}, step=epoch)
            if adapter.should_stop:
                print(f"stopped after epoch {epoch}: {adapter.stop_message}")
                break
    print(f"learning rate now {optimizer.param_groups[0]['lr']:.4g}")

    manifest = fcb.torch.read_manifest(os.path.join(run_dir, "manifest.json"))
    print(f"{'slot':<28}{'step':>6}{'val_loss':>12}  file")
    for slot, record in sorted(manifest["slots"].items()):
        print(f"{slot:<28}{record['step']:>6}{record['value']:>12.5f}  {record['link']}")

    # Load the best checkpoint back (size and CRC-32 checked against the manifest).
    best = fcb.torch.load_checkpoint(os.path.join(run_dir, "best_model.pt"))
    model.load_state_dict(best["model"])
    with torch.no_grad():
        reloaded = torch.nn.functional.mse_loss(model(x_val), y_val).item()
    print(f"best model reloaded: val_loss {reloaded:.5f} (step {best['fcb']['step']})")


if __name__ == "__main__":
    main()
