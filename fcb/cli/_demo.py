"""`fcb demo`: a small model trained with Torch or with JAX (equinox, optax, orbax) under the
same callbacks and data, and the summary of its run."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from .._host.manifest import MANIFEST_NAME
from .._host.rundir import HISTORY_NAME
from ._common import UsageError, _install_hint, _Progress
from ._demo_report import DEMO_SETTINGS, DEMO_SIZES, _demo_summary, _kept

DEMO_MARKER = "demo.json"
"""Written into a demo run directory, so that a later `fcb demo` may replace that run."""
DEMO_LR = 0.0005
FRAMEWORK_MODULES = {
    "torch": (["torch"], "PyTorch", "torch"),
    "jax": (["equinox", "optax", "orbax.checkpoint"], "orbax-checkpoint, optax and equinox",
            "jax"),
}
"""Per --framework: the modules the demo imports, what to call them, and fcb's extra."""


def _demo_callbacks() -> Any:
    from .. import BestCheckpoint, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, chain

    return chain(
        EarlyStopping("val_loss", **DEMO_SETTINGS["early_stopping"]),
        ModelCheckpoint("val_loss", **DEMO_SETTINGS["model_checkpoint"]),
        BestCheckpoint("val_loss", **DEMO_SETTINGS["best_checkpoint"]),
        ReduceLROnPlateau("val_loss", **DEMO_SETTINGS["reduce_lr_on_plateau"]),
    )


def _check_dependencies(framework: str) -> None:
    """A usage error naming the install command unless the framework's modules import:
    checked before anything is written or replaced."""
    import importlib

    modules, what, extra = FRAMEWORK_MODULES[framework]
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError as error:
        other = "jax" if framework == "torch" else "torch"
        raise UsageError(
            f"fcb demo --framework {framework} needs {what} ({error}); install with "
            f"{_install_hint(extra)}, or run --framework {other}. The run in the --out "
            f"directory was left as it was."
        ) from None


def _prepare_demo_dir(out: str) -> None:
    """A fresh run directory: a previous demo run there is replaced, anything else refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a directory.")
    if not os.path.exists(os.path.join(out, MANIFEST_NAME)) and not os.path.exists(
        os.path.join(out, HISTORY_NAME)
    ):
        return
    if not os.path.exists(os.path.join(out, DEMO_MARKER)):
        raise UsageError(
            f"{out} already holds an fcb run that `fcb demo` did not write; pass another --out."
        )
    manifest_links = []
    try:
        with open(os.path.join(out, MANIFEST_NAME), "rb") as f:
            manifest_links = [s.get("link") for s in json.loads(f.read())["slots"].values()]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    for name in [MANIFEST_NAME, HISTORY_NAME, DEMO_MARKER, *filter(None, manifest_links)]:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.unlink(path)
    shutil.rmtree(os.path.join(out, "steps"), ignore_errors=True)


def _demo(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}.")
    out = args.out
    _check_dependencies(args.framework)  # before a previous run is replaced
    _prepare_demo_dir(out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    run = _demo_torch if args.framework == "torch" else _demo_jax
    progress = _Progress(args.epochs, sys.stderr, enabled=not args.quiet)
    with open(os.path.join(out, DEMO_MARKER), "w") as f:
        json.dump({"framework": args.framework, "epochs": args.epochs, "seed": args.seed}, f)
    try:
        report = run(out, args.epochs, args.seed, progress)
    except KeyboardInterrupt:
        progress.close()
        print(f"fcb demo: interrupted; {_kept(out, args.framework)}", file=sys.stderr)
        return 130
    progress.close()
    elapsed = time.perf_counter() - start
    _demo_summary(sys.stdout, out, args.framework, report, elapsed)
    return 0


def _demo_data(seed: int) -> tuple[Any, ...]:
    """A noisy regression problem with few training samples: validation loss falls, levels
    off, then rises as the network overfits. NumPy, so both frameworks see the same data."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = DEMO_SIZES["train"] + DEMO_SIZES["val"]
    d = DEMO_SIZES["features"]
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = (rng.standard_normal((d, 1)) / math.sqrt(d)).astype(np.float32)
    y = x @ w + 0.5 * np.sin(3 * x[:, :1]) + 0.5 * rng.standard_normal((n, 1))
    y = y.astype(np.float32)
    t = DEMO_SIZES["train"]
    return x[:t], y[:t], x[t:], y[t:]


def _progress_text(metrics: Mapping[str, float], best: tuple[float, int] | None, lr: float) -> str:
    text = f"val_loss {metrics['val_loss']:.4f}"
    if best is not None:
        text += f"  best {best[0]:.4f} @ epoch {best[1]}"
    return text + f"  lr {lr:.2g}"


_Check = Callable[[int], tuple[Mapping[str, float], Any, float]]
"""One epoch: train, evaluate, run the check; its metrics, actions and learning rate after them."""


def _fit(
    adapter: Any, epochs: int, progress: _Progress, check: _Check,
    before_end: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """The demo's loop, the same for both frameworks: `check` each epoch until the callbacks
    stop training, then end the fit. What `before_end` returns (run before `on_fit_end`) is the
    report's `written`; an error ends the fit through `on_exception`."""
    best: tuple[float, int] | None = None
    checks = 0
    try:
        for epoch in range(epochs):
            metrics, actions, lr = check(epoch)
            checks += 1
            held = actions.slots["best_model"]
            if held >= 0:
                best = (float(actions.slot_values["best_model"]), int(held))
            progress.update(epoch, _progress_text(metrics, best, lr))
            if adapter.should_stop:
                break
        written = before_end() if before_end is not None else None
        summary = adapter.on_fit_end()
    except BaseException as error:
        adapter.on_exception(error)
        raise
    return {
        "checks": checks,
        "stop": adapter.stop_message,
        "last_step": epoch,
        "written": written,
        "summary": summary,
        "lr": (DEMO_LR, lr),
    }


def _demo_torch(out: str, epochs: int, seed: int, progress: _Progress) -> dict[str, Any]:
    import torch

    from ..torch import TorchAdapter

    # A model this small gains nothing from intra-op threads, and on a small CPU their
    # spin-waiting next to JAX's thread pool made each epoch over ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_torch(torch, TorchAdapter, out, epochs, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _train_torch(
    torch: Any, TorchAdapter: Any, out: str, epochs: int, seed: int, progress: _Progress
) -> dict[str, Any]:
    torch.manual_seed(seed)
    x, y, x_val, y_val = (torch.from_numpy(a) for a in _demo_data(seed))
    h, d = DEMO_SIZES["hidden"], DEMO_SIZES["features"]
    model = torch.nn.Sequential(
        torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, h), torch.nn.Tanh(),
        torch.nn.Linear(h, 1),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=DEMO_LR, momentum=0.9)
    adapter = TorchAdapter(
        _demo_callbacks(), model=model, optimizer=optimizer, dirpath=out, history=True,
        existing_run="start_over",  # `_prepare_demo_dir` made sure it is a demo's run
    )

    def check(epoch: int) -> tuple[dict[str, float], Any, float]:
        model.train()
        for batch in torch.randperm(len(x)).split(DEMO_SIZES["batch"]):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            metrics = {
                "val_loss": torch.nn.functional.mse_loss(model(x_val), y_val).item(),
                "train_loss": torch.nn.functional.mse_loss(model(x), y).item(),
            }
        actions = adapter.on_validation_end(metrics, step=epoch)
        assert actions is not None  # checks run at validation end
        return metrics, actions, optimizer.param_groups[0]["lr"]

    def written() -> tuple[int, int]:
        adapter.wait()
        assert adapter.store is not None
        return adapter.store.files_written, adapter.store.bytes_written

    adapter.on_fit_start()
    report = _fit(adapter, epochs, progress, check, before_end=written)
    return {**report, "model": f"MLP {d}-{h}-{h}-1 (torch), SGD with momentum"}


def _demo_jax(out: str, epochs: int, seed: int, progress: _Progress) -> dict[str, Any]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    from .._core import scaled_lr
    from ..orbax import OrbaxAdapter

    x, y, x_val, y_val = (jnp.asarray(a) for a in _demo_data(seed))
    h, d = DEMO_SIZES["hidden"], DEMO_SIZES["features"]
    key, model_key = jax.random.split(jax.random.PRNGKey(seed))
    model = eqx.nn.MLP(d, 1, h, depth=2, activation=jnp.tanh, key=model_key)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=DEMO_LR, momentum=0.9)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    def mse(model: Any, xs: Any, ys: Any) -> Any:
        return jnp.mean((jax.vmap(model)(xs) - ys) ** 2)

    @eqx.filter_jit
    def train_epoch(model: Any, opt_state: Any, key: Any) -> tuple[Any, Any]:
        order = jax.random.permutation(key, x.shape[0]).reshape(-1, DEMO_SIZES["batch"])
        params, static = eqx.partition(model, eqx.is_array)

        def step(carry: Any, batch: Any) -> tuple[Any, None]:
            params, opt_state = carry
            grads = jax.grad(lambda p: mse(eqx.combine(p, static), x[batch], y[batch]))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
        return eqx.combine(params, static), opt_state

    @eqx.filter_jit
    def evaluate(model: Any) -> tuple[Any, Any]:
        return mse(model, x_val, y_val), mse(model, x, y)

    def after_check(model: Any, opt_state: Any) -> Any:
        """The state after a check's actions: what its checkpoint holds, and what training
        continues from (the learning rate lowered when `ReduceLROnPlateau` says so)."""

        def state(actions: Any) -> dict[str, Any]:
            lr = scaled_lr(opt_state.hyperparams["learning_rate"], actions)
            hyperparams = {**opt_state.hyperparams, "learning_rate": lr}
            return {
                "model": eqx.filter(model, eqx.is_array),
                "opt_state": opt_state._replace(hyperparams=hyperparams),
            }

        return state

    adapter = OrbaxAdapter(
        _demo_callbacks(),
        out,
        background=True,
        history=True,
        existing_run="start_over",  # `_prepare_demo_dir` made sure it is a demo's run
        learning_rate=lambda state: state["opt_state"].hyperparams["learning_rate"],
    )
    adapter.on_fit_start()

    def check(epoch: int) -> tuple[dict[str, float], Any, float]:
        nonlocal key, model, opt_state
        key, epoch_key = jax.random.split(key)
        model, opt_state = train_epoch(model, opt_state, epoch_key)
        val_loss, train_loss = evaluate(model)
        metrics = {"val_loss": float(val_loss), "train_loss": float(train_loss)}
        state = after_check(model, opt_state)
        actions = adapter.on_validation_end(metrics, step=epoch, state=state)
        opt_state = state(actions)["opt_state"]
        return metrics, actions, float(opt_state.hyperparams["learning_rate"])

    report = _fit(adapter, epochs, progress, check)
    return {
        **report,
        "model": f"MLP {d}-{h}-{h}-1 (equinox), optax SGD with momentum, orbax checkpoints",
    }


