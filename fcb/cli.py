"""The `fcb` command: `demo`, `inspect`, `replay` and `plot`.

Every user mistake ends in one line on stderr (`fcb <command>: error: ...`) and exit code 2;
a corrupt checkpoint found by `inspect` exits with 1. Torch, orbax and matplotlib are imported
only by the subcommands that need them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, NoReturn

from ._errors import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    MetricShapeError,
    MetricTypeError,
    MissingMetricError,
    StateDictError,
)
from ._history import HISTORY_NAME, HistoryLog, check_record, find_history, read_records
from ._manifest import MANIFEST_NAME

USAGE_EXIT = 2
CORRUPT_EXIT = 1
DEMO_MARKER = "demo.json"
"""Written into a demo run directory, so that a later `fcb demo` may replace that run."""


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line, exit code 2."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage block) raised to `main`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


# -- shared helpers --------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _value(value: Any) -> str:
    if isinstance(value, str):  # non-finite numbers are spelled out in manifests
        return value
    if value is None:
        return "-"
    return f"{float(value):.5g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _find_manifest(run_dir: str) -> str:
    """The directory holding a run's manifest: RUN_DIR or RUN_DIR/checkpoints."""
    if not os.path.exists(run_dir):
        raise UsageError(f"{run_dir} does not exist.")
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is not a directory; pass a run directory.")
    for candidate in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.isfile(os.path.join(candidate, MANIFEST_NAME)):
            return candidate
    raise UsageError(
        f"{run_dir} has no {MANIFEST_NAME} (nor checkpoints/{MANIFEST_NAME}): not an fcb run "
        f"directory, or no checkpoint was written yet."
    )


def _storage(directory: str) -> str:
    try:
        with open(os.path.join(directory, MANIFEST_NAME), "rb") as f:
            raw = json.loads(f.read())
    except (OSError, ValueError):
        return "torch"  # read_manifest reports what is wrong with it
    return str(raw.get("storage", "torch")) if isinstance(raw, dict) else "torch"


def _monitor_of(config: Any) -> tuple[str, str] | None:
    """The first (metric, mode) a state dict's recorded config monitors."""
    if isinstance(config, Mapping):
        key = config.get("monitor", config.get("metric_key"))
        if isinstance(key, str) and config.get("mode") in ("min", "max"):
            return key, str(config["mode"])
        for value in config.values():
            found = _monitor_of(value)
            if found:
                return found
    elif isinstance(config, list):
        for value in config:
            found = _monitor_of(value)
            if found:
                return found
    return None


# -- fcb demo --------------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar on a terminal; a line every 10 checks otherwise."""

    def __init__(self, total: int, stream: IO[str], enabled: bool = True):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.tty = enabled and stream.isatty()
        self.width = 0

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            filled = round(24 * done / self.total)
            line = f"\repoch {done:>3}/{self.total} [{'#' * filled}{'.' * (24 - filled)}] {text}"
            self.width = max(self.width, len(line))
            self.stream.write(line.ljust(self.width))
            self.stream.flush()
        elif done % 10 == 0 or done == self.total:
            self.stream.write(f"epoch {done:>3}/{self.total}  {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _demo_callbacks() -> Any:
    from . import BestCheckpoint, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, chain

    return chain(
        EarlyStopping("val_loss", patience=10, min_delta=1e-3),
        ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
        BestCheckpoint("val_loss", tolerances=(3, 6)),
        ReduceLROnPlateau("val_loss", factor=0.5, patience=4),
    )


DEMO_SIZES = {"train": 256, "val": 1024, "features": 20, "hidden": 256, "batch": 32}
DEMO_LR = 0.0005


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
    _prepare_demo_dir(out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    run = _demo_torch if args.framework == "torch" else _demo_jax
    progress = _Progress(args.epochs, sys.stderr, enabled=not args.quiet)
    with open(os.path.join(out, DEMO_MARKER), "w") as f:
        json.dump({"framework": args.framework, "epochs": args.epochs, "seed": args.seed}, f)
    report = run(out, args.epochs, args.seed, progress)
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
        text += f"  best {best[0]:.4f} @ {best[1]}"
    return text + f"  lr {lr:.2g}"


def _demo_torch(out: str, epochs: int, seed: int, progress: _Progress) -> dict[str, Any]:
    try:
        import torch

        from .torch import TorchAdapter
    except ImportError as error:
        raise UsageError(
            f"fcb demo needs PyTorch ({error}); install it with "
            f"pip install -c constraints.txt 'fcb[torch]', or run --framework jax."
        ) from None

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
        _demo_callbacks(), model=model, optimizer=optimizer, dirpath=out, history=True
    )
    adapter.on_fit_start()
    best: tuple[float, int] | None = None
    checks = 0
    try:
        for epoch in range(epochs):
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
            checks += 1
            held = actions.slots["best_model"]
            if held >= 0:
                best = (float(actions.slot_values["best_model"]), int(held))
            lr = optimizer.param_groups[0]["lr"]
            progress.update(epoch + 1, _progress_text(metrics, best, lr))
            if adapter.should_stop:
                break
        adapter.wait()
        assert adapter.store is not None
        written = (adapter.store.files_written, adapter.store.bytes_written)
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
        "lr": (DEMO_LR, optimizer.param_groups[0]["lr"]),
        "model": f"MLP {d}-{h}-{h}-1 (torch), SGD with momentum",
    }


def _demo_jax(out: str, epochs: int, seed: int, progress: _Progress) -> dict[str, Any]:
    try:
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax

        from .orbax import OrbaxAdapter
    except ImportError as error:
        raise UsageError(
            f"fcb demo --framework jax needs orbax-checkpoint and optax ({error}); install them "
            f"with pip install -c constraints.txt 'fcb[jax]'."
        ) from None
    from ._core import scaled_lr

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

    adapter = OrbaxAdapter(_demo_callbacks(), out, async_save=True)
    adapter.on_fit_start()
    history = HistoryLog(out)  # the orbax adapter records no history; the demo does
    history.start(None)
    best: tuple[float, int] | None = None
    checks = 0
    try:
        for epoch in range(epochs):
            key, epoch_key = jax.random.split(key)
            model, opt_state = train_epoch(model, opt_state, epoch_key)
            val_loss, train_loss = evaluate(model)
            metrics = {"val_loss": float(val_loss), "train_loss": float(train_loss)}
            state = after_check(model, opt_state)
            actions = adapter.on_validation_end(metrics, step=epoch, state=state)
            opt_state = state(actions)["opt_state"]
            lr_now = float(opt_state.hyperparams["learning_rate"])
            checks += 1
            history.append(
                check_record(
                    epoch,
                    metrics,
                    lr=[lr_now],
                    events=[n for n, fired in actions.events.items() if bool(fired)],
                    stop=actions.stop_message() if bool(actions.stop) else None,
                )
            )
            held = actions.slots["best_model"]
            if held >= 0:
                best = (float(actions.slot_values["best_model"]), int(held))
            progress.update(epoch + 1, _progress_text(metrics, best, lr_now))
            if adapter.should_stop:
                break
        summary = adapter.on_fit_end()
    except BaseException as error:
        adapter.on_exception(error)
        raise
    from ._manifest import json_metrics

    history.append({"summary": json_metrics(summary)})
    return {
        "checks": checks,
        "stop": adapter.stop_message,
        "last_step": epoch,
        "written": None,
        "summary": summary,
        "lr": (DEMO_LR, lr_now),
        "model": f"MLP {d}-{h}-{h}-1 (equinox), optax SGD with momentum, orbax checkpoints",
    }


def _slot_rows(directory: str, manifest: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, slot in sorted(manifest["slots"].items(), key=lambda item: item[0]):
        shown = slot.get("link") or slot["file"]
        rows.append([name, str(slot["step"]), _value(slot.get("value")),
                     os.path.join(directory, shown)])
    return rows


def _demo_summary(
    out: IO[str], directory: str, framework: str, report: Mapping[str, Any], elapsed: float
) -> None:
    storage = "orbax" if framework == "jax" else "torch"
    from ._manifest import read_manifest

    manifest = read_manifest(os.path.join(directory, MANIFEST_NAME), storage=storage)
    last = report["last_step"]
    print(f"fcb demo ({framework}): {report['model']}", file=out)
    print(
        f"  data: {DEMO_SIZES['train']} training and {DEMO_SIZES['val']} validation samples "
        f"(synthetic, seeded)",
        file=out,
    )
    if report["stop"]:
        print(f"stopped after epoch {last}: {report['stop']}", file=out)
    else:
        print(f"trained all {report['checks']} epochs without stopping", file=out)
    line = f"{report['checks']} checks in {elapsed:.1f} s"
    if report["written"]:
        files, size = report["written"]
        line += f"; {files} checkpoint files written ({_size(size)}), {len(manifest['files'])} kept"
    else:
        line += f"; {len(manifest['files'])} checkpointed steps kept"
    print(line, file=out)
    first_lr, last_lr = report["lr"]
    if not math.isclose(last_lr, first_lr, rel_tol=1e-6):
        print(f"learning rate {first_lr:g} -> {last_lr:.3g} (ReduceLROnPlateau)", file=out)
    print("", file=out)
    print(_table(["slot", "step", "val_loss", "file"], _slot_rows(directory, manifest), {1, 2}),
          file=out)
    summary = report["summary"]
    tolerances = sorted(
        {k.split("/")[0] for k in summary if ".tolerance=" in k},
        key=lambda s: int(s.rsplit("=", 1)[1]),
    )
    if tolerances:
        print("", file=out)
    for slot in tolerances:
        t = slot.rsplit("=", 1)[1]
        stopped = summary.get(f"{slot}/stopped_step", -1.0)
        kept = int(summary.get(f"{slot}/best_step", -1.0))
        when = f"have stopped after epoch {int(stopped)}" if stopped >= 0 else "not have stopped"
        print(
            f"EarlyStopping(patience={t}) would {when}, keeping epoch {kept} "
            f"(val_loss {_value(summary.get(f'{slot}/best_value'))}): slot {slot}",
            file=out,
        )
    print("", file=out)
    print("next:", file=out)
    print(f"  fcb inspect {directory}", file=out)
    print(f"  fcb plot {directory} -o demo.png", file=out)
    print(
        f"  fcb replay {os.path.join(directory, HISTORY_NAME)} --monitor val_loss "
        f"--patience 1:30 --min-delta 0,1e-3 --plot replay.png",
        file=out,
    )


# -- fcb inspect -----------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    directory = _find_manifest(args.run_dir)
    storage = _storage(directory)
    from ._manifest import read_manifest

    try:
        manifest = read_manifest(os.path.join(directory, MANIFEST_NAME), storage=storage)
    except CheckpointCorruptError as error:
        _fail(args, str(error))
        return CORRUPT_EXIT
    check = _check_torch_file if storage == "torch" else _check_orbax_step
    problems: list[str] = []
    status: dict[str, tuple[str, int | None]] = {}
    size: int | None
    for relative, record in sorted(manifest["files"].items()):
        path = os.path.join(directory, relative)
        try:
            size = check(path, record)
            status[relative] = ("ok", size)
        except CheckpointCorruptError as error:
            status[relative] = ("CORRUPT", None)
            problems.append(str(error))
    notes = []
    rows = []
    for name, slot in sorted(manifest["slots"].items()):
        state, size = status.get(slot["file"], ("CORRUPT", None))
        link = slot.get("link")
        if link and state == "ok":
            link_path = os.path.join(directory, link)
            if not os.path.exists(link_path):
                notes.append(f"{link} is missing (the next run in this directory restores it)")
            elif not os.path.samefile(link_path, os.path.join(directory, slot["file"])):
                stale = _step_file_of(directory, link_path)
                if stale is not None:
                    # a commit interrupted after its manifest and before its links: the manifest
                    # and its files are intact, and the next open re-points the name
                    notes.append(
                        f"{link} still names {stale} (an interrupted commit); the slot's "
                        f"checkpoint is {slot['file']}, and the next run re-points the name"
                    )
                    rows.append([
                        name, str(slot["step"]), _value(slot.get("value")), link,
                        "-" if size is None else _size(size), state,
                    ])
                    continue
                try:
                    _check_torch_file(link_path, manifest["files"][slot["file"]])
                except CheckpointCorruptError:
                    state = "CORRUPT"
                    problems.append(
                        f"{link_path} is not the checkpoint of step {slot['step']} that slot "
                        f"{name!r} holds ({slot['file']}): it was replaced or edited."
                    )
        rows.append([
            name, str(slot["step"]), _value(slot.get("value")), link or slot["file"],
            "-" if size is None else _size(size), state,
        ])
    print(f"run: {directory} (fcb.{storage}; last check at step {manifest.get('event_step')})")
    if rows:
        print(_table(["slot", "step", "metric", "file", "size", "check"], rows, {1, 2, 4}))
    else:
        print("no slot holds a checkpoint yet")
    resume = manifest.get("resume")
    if resume:
        line = f"resume point: step {resume['step']}"
        if resume.get("stop_message"):
            line += f" (the run stopped there: {resume['stop_message']})"
        print(line)
    for note in notes:
        print(f"note: {note}")
    total = sum(size or 0 for _, size in status.values())
    if problems:
        for problem in problems:
            _fail(args, problem)
        return CORRUPT_EXIT
    print(f"{len(status)} checkpoint{'s' if len(status) != 1 else ''} ({_size(total)}) match the "
          f"manifest.")
    return 0


def _step_file_of(directory: str, link_path: str) -> str | None:
    """The file under `steps/` that `link_path` is a hard link of, if any."""
    steps = os.path.join(directory, "steps")
    if not os.path.isdir(steps):
        return None
    for name in os.listdir(steps):
        candidate = os.path.join(steps, name)
        if os.path.isfile(candidate) and os.path.samefile(candidate, link_path):
            return f"steps/{name}"
    return None


def _check_torch_file(path: str, record: Mapping[str, Any]) -> int:
    from ._files import verify

    if "size" not in record or "crc32" not in record:
        raise CheckpointCorruptError(
            f"the manifest records no size and checksum for {path} (edited by hand?)."
        )
    verify(path, dict(record))
    return int(record["size"])


def _check_orbax_step(path: str, record: Mapping[str, Any]) -> int:
    try:
        import orbax.checkpoint as ocp

        from .orbax._store import read_meta, read_step
    except ImportError as error:
        raise UsageError(
            f"this run was written by fcb.orbax; reading it needs orbax-checkpoint ({error}): "
            f"pip install -c constraints.txt 'fcb[jax]'."
        ) from None
    if not os.path.isdir(path):
        raise CheckpointCorruptError(f"{path} is missing (the manifest records it).")
    absolute = os.path.abspath(path)  # orbax reads absolute paths only
    if not ocp.utils.is_checkpoint_finalized(absolute):
        raise CheckpointCorruptError(f"{path} is not a committed orbax checkpoint.")
    try:
        meta = read_meta(absolute)
        if meta.get("step") not in (None, record.get("step")):
            raise CheckpointCorruptError(
                f"{path} holds step {meta.get('step')}, the manifest records {record.get('step')}."
            )
        read_step(absolute, None, with_meta=False)  # every array must decode
    except CheckpointCorruptError:
        raise
    except Exception as error:  # orbax / tensorstore raise many types for damaged files
        raise CheckpointCorruptError(
            f"{path} cannot be read back ({type(error).__name__}: {str(error)[:200]})."
        ) from None
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


# -- fcb replay ------------------------------------------------------------------------------


def _parse_values(option: str, spec: str, *, integer: bool) -> list[Any]:
    """`1:50` (inclusive), `1:50:5`, `0,1e-3,1e-2`, or a mix: `1,2,5:20:5`."""
    values: list[Any] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                bounds = [float(p) for p in part.split(":")]
                if len(bounds) not in (2, 3):
                    raise ValueError
                low, high = bounds[0], bounds[1]
                step = bounds[2] if len(bounds) == 3 else 1.0
                if step <= 0 or high < low:
                    raise ValueError
                count = math.floor((high - low) / step + 1e-9) + 1
                values += [low + i * step for i in range(count)]
            else:
                values.append(float(part))
        except ValueError:
            raise UsageError(
                f"{option} {spec!r}: expected numbers and inclusive ranges such as 1:50, "
                f"1:50:5 or 0,1e-3,1e-2."
            ) from None
    if integer:
        if any(v != round(v) for v in values):
            raise UsageError(f"{option} {spec!r}: expected whole numbers.")
        return [round(v) for v in values]
    # ranges accumulate binary rounding (0.1 + 0.2): keep what the user would have typed
    return [float(f"{v:.12g}") for v in values]


def _replay(args: argparse.Namespace) -> int:
    from . import _early_stopping
    from ._replay import grid, replay

    patience = _parse_values("--patience", args.patience, integer=True)
    min_delta = _parse_values("--min-delta", args.min_delta, integer=False)
    if not os.path.exists(args.history):
        raise UsageError(f"{args.history} does not exist.")
    if args.plot:
        _require_matplotlib()
    batch = grid(
        _early_stopping.EarlyStopping,
        monitor=args.monitor,
        mode=args.mode,
        patience=patience,
        min_delta=min_delta,
    )
    result = replay(batch, args.history, steps=args.steps)
    print(result.table(max_rows=None if args.rows == 0 else args.rows, sort_by=args.sort))
    best = result.best()
    print()
    print(
        f"best {result.monitor}: {best['best_value']:.6g} at step {best['best_step']} with "
        f"patience={best['patience']}, min_delta={best['min_delta']:g} ({best['checks']} checks)"
    )
    front = result.pareto()
    if len(front) > 1:
        print("trade-offs (fewer checks, or a better value):")
        for index in front:
            row = result.row(int(index))
            print(
                f"  patience={row['patience']:<4} min_delta={row['min_delta']:<8g} "
                f"{row['checks']:>5} checks  best {result.monitor} {row['best_value']:.6g}"
            )
    if args.plot:
        _plot_replay(result, args.plot, args.history)
        print(f"plot: {args.plot}")
    return 0


# -- plots -----------------------------------------------------------------------------------


def _require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "plots need matplotlib: pip install -c constraints.txt 'fcb[plot]'."
        ) from None
    return plt


def _save(fig: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"cannot write {path}: {directory} does not exist.")
    try:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot write {path}: {error}") from None


def _plot_replay(result: Any, path: str, source: str) -> None:
    import numpy as np

    plt = _require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    patience = np.asarray([c["patience"] for c in result.configs])
    deltas = sorted({c["min_delta"] for c in result.configs})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(deltas)))
    for delta, color in zip(deltas, colors, strict=True):
        rows = np.asarray([c["min_delta"] == delta for c in result.configs])
        order = np.argsort(patience[rows])
        left.plot(patience[rows][order], result.checks[rows][order], "-", marker=".",
                  color=color, label=f"min_delta = {delta:g}")
    left.axhline(len(result.steps), color="0.5", ls=":", lw=1.2,
                 label="end of the history (never stopped)")
    left.set_xlabel("patience (checks without improvement before stopping)")
    left.set_ylabel("checks run (training cost)")
    left.set_title("When each configuration stops")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    scatter = right.scatter(result.checks, result.best_value, c=patience, cmap="viridis", s=18,
                            alpha=0.8)
    fig.colorbar(scatter, ax=right, label="patience")
    front = result.pareto()
    right.plot(result.checks[front], result.best_value[front], "-", color="crimson", lw=1.5,
               label="trade-off front")
    best = int(result.order("best_value")[0])
    right.plot(result.checks[best], result.best_value[best], "*", color="gold", ms=16,
               markeredgecolor="black", label=(
                   f"best: patience={result.configs[best]['patience']}, "
                   f"min_delta={result.configs[best]['min_delta']:g}"))
    right.set_xlabel("checks run (training cost)")
    right.set_ylabel(f"best {result.monitor} kept")
    right.set_title(f"Best {result.monitor} kept vs training cost")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(
        f"EarlyStopping replayed on {os.path.basename(os.path.normpath(source))}: "
        f"{len(result)} configurations x {len(result.steps)} checks"
    )
    _save(fig, path)
    plt.close(fig)


def _plot(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.run_dir):
        raise UsageError(f"{args.run_dir} is not a directory; pass a run directory.")
    history_path = find_history(args.run_dir)
    if history_path is None:
        raise UsageError(
            f"{args.run_dir} has no {HISTORY_NAME}: record one with "
            f"fcb.torch.TorchAdapter(..., history=True) (fcb demo does)."
        )
    try:
        records = read_records(history_path)
    except ValueError as error:
        raise UsageError(str(error)) from None
    checks = [r for r in records if isinstance(r.get("metrics"), dict)]
    if not checks:
        raise UsageError(f"{history_path} records no check yet.")
    summary: dict[str, Any] = {}
    for record in records:
        if isinstance(record.get("summary"), dict):
            summary = record["summary"]
    manifest: dict[str, Any] = {}
    try:
        directory = _find_manifest(args.run_dir)
        from ._manifest import read_manifest

        manifest = read_manifest(os.path.join(directory, MANIFEST_NAME), _storage(directory))
    except (UsageError, CheckpointCorruptError):
        pass  # the curve alone is still worth plotting
    monitored = _monitor_of((manifest.get("callbacks") or {}).get("config"))
    available = list(dict.fromkeys(k for r in checks for k in r["metrics"]))
    metric = args.metric or (monitored[0] if monitored else None)
    if metric is None:
        metric = "val_loss" if "val_loss" in available else available[0]
    if metric not in available:
        raise UsageError(
            f"--metric {metric!r} is not in {history_path}; recorded metrics: {available}."
        )
    mode = monitored[1] if monitored and monitored[0] == metric else "min"
    plt = _require_matplotlib()
    _plot_run(plt, args.output, args.run_dir, checks, summary, manifest, metric, mode)
    print(f"plot: {args.output}")
    return 0


def _plot_run(
    plt: Any,
    path: str,
    run_dir: str,
    checks: list[dict[str, Any]],
    summary: Mapping[str, Any],
    manifest: Mapping[str, Any],
    metric: str,
    mode: str,
) -> None:
    steps = [r["step"] for r in checks]
    values = [float(r["metrics"].get(metric, math.nan)) for r in checks]
    value_at = dict(zip(steps, values, strict=True))
    lrs = [r["lr"][0] if r.get("lr") else math.nan for r in checks]
    has_lr = len({lr for lr in lrs if math.isfinite(lr)}) > 1
    if has_lr:
        fig, (ax, lr_ax) = plt.subplots(
            2, 1, figsize=(12, 6.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    else:
        fig, ax = plt.subplots(figsize=(12, 5))
        lr_ax = None
    others = [k for k in checks[0]["metrics"] if k != metric and "loss" in k and "loss" in metric]
    slots = manifest.get("slots", {})
    tolerance_slots = sorted(
        (name for name in slots if ".tolerance=" in name), key=lambda s: int(s.rsplit("=", 1)[1])
    )
    best_steps = sorted({
        slot["step"] for name, slot in slots.items()
        if name not in tolerance_slots and name != "last" and "-top" not in name
    })
    stop = next((r for r in checks if r.get("stop")), None)
    finite = [v for v in values if math.isfinite(v)]
    span = (max(finite) - min(finite)) if finite else 1.0
    colors = ["tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]

    def draw(axes: Any, offset: float, labels: bool) -> None:
        """The curve and every marker; `offset` lifts the tolerance markers off the curve."""
        def label(text: str) -> str | None:
            return text if labels else None

        axes.plot(steps, values, "-", color="tab:blue", lw=1.8, marker=".", ms=5,
                  label=label(metric))
        for key in others:
            axes.plot(steps, [r["metrics"].get(key, math.nan) for r in checks], "--",
                      color="0.6", lw=1, label=label(key))
        for best_step in best_steps:
            value = value_at.get(best_step, math.nan)
            axes.plot(best_step, value, "*", color="gold", ms=20, markeredgecolor="black",
                      zorder=6, label=label(f"best: {value:.4g} at step {best_step}"))
        for i, slot in enumerate(tolerance_slots):
            t, color = slot.rsplit("=", 1)[1], colors[i % len(colors)]
            kept = slots[slot]["step"]
            value = value_at.get(kept, math.nan)
            stopped = summary.get(f"{slot}/stopped_step", -1)
            text = f"patience {t} would keep step {kept}"
            if isinstance(stopped, (int, float)) and stopped >= 0:
                text += f" (stops at {int(stopped)}, dotted)"
                axes.axvline(stopped, color=color, ls=":", lw=1.4)
            # below the curve, pointing up at the kept check: visible even under the best star
            below = value - offset * (i + 1)
            axes.plot([kept, kept], [below, value], "-", color=color, lw=1, zorder=4)
            axes.plot(kept, below, "^", color=color, ms=11, markeredgecolor="black", zorder=5,
                      label=label(text))
        if stop is not None:
            short = "patience ran out" if "patience" in stop["stop"] else stop["stop"]
            axes.axvline(stop["step"], color="crimson", ls="--", lw=1.8,
                         label=label(f"stopped at step {stop['step']}: {short}"))

    draw(ax, 0.04 * span, labels=True)
    ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    title = f"{metric} per check, {os.path.normpath(run_dir)}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    marked = best_steps + [slots[s]["step"] for s in tolerance_slots]
    if marked and finite:
        # the decisions happen on the plateau, which the first checks' scale flattens: zoom in
        first = max(min(marked) - 3, steps[0])
        window = [v for s, v in zip(steps, values, strict=True) if s >= first and math.isfinite(v)]
        low, high = min(window), max(window)
        if high - low < 0.3 * span:
            # flush with the top right corner, so no line of the main axes shows beside it
            zoom = ax.inset_axes((0.42, 0.38, 0.58, 0.62))
            pad = 0.1 * (high - low + 1e-12)
            draw(zoom, 0.12 * (high - low + 1e-12), labels=False)
            offset_room = 0.12 * (high - low + 1e-12) * (len(tolerance_slots) + 1)
            zoom.set_xlim(first - 0.5, steps[-1] + 0.5)
            zoom.set_ylim(low - offset_room, high + pad)
            zoom.grid(alpha=0.3)
            zoom.text(0.02, 0.04, f"steps {first} to {steps[-1]}, zoomed", transform=zoom.transAxes,
                      fontsize=8, va="bottom", color="0.3")
            zoom.tick_params(labelsize=8)
            ax.indicate_inset_zoom(zoom, edgecolor="0.4")
    if lr_ax is not None:
        lr_ax.step(steps, lrs, where="post", color="tab:orange", lw=1.6)
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(alpha=0.3)
        lr_ax.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# -- entry point -----------------------------------------------------------------------------


def _parser() -> _Parser:
    parser = _Parser(
        prog="fcb",
        description="Functional, pure-state training callbacks: demo, inspect, replay, plot.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo", help="train a small model with early stopping and checkpoints",
        description="Train a small model on synthetic data with EarlyStopping, "
        "ModelCheckpoint, BestCheckpoint(tolerances) and ReduceLROnPlateau.",
    )
    demo.add_argument("--out", default=os.path.join("runs", "demo"),
                      help="run directory (default: runs/demo; a previous demo run is replaced)")
    demo.add_argument("--framework", choices=("torch", "jax"), default="torch")
    demo.add_argument("--epochs", type=int, default=100, help="maximum epochs (default: 100)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser(
        "inspect", help="list a run's checkpoints and check them against the manifest",
        description="Table of slots; every file is checked against the manifest (size and "
        "CRC-32 for Torch runs). Exits with 1 on any corruption.",
    )
    inspect.add_argument("run_dir", metavar="RUN_DIR")
    inspect.set_defaults(run=_inspect)

    rep = commands.add_parser(
        "replay", help="replay EarlyStopping configurations over a recorded history",
        description="Run every combination of --patience and --min-delta over a recorded "
        "metric history (CSV with a header row, JSONL, or a run directory) at once.",
    )
    rep.add_argument("history", metavar="HISTORY")
    rep.add_argument("--monitor", required=True, help="the metric to monitor, e.g. val_loss")
    rep.add_argument("--mode", choices=("min", "max"), default="min")
    rep.add_argument("--patience", default="1:30",
                     help="values: 1:50 (inclusive range), 1:50:5, or 1,2,5 (default: 1:30)")
    rep.add_argument("--min-delta", default="0", help="values, e.g. 0,1e-3,1e-2 (default: 0)")
    rep.add_argument("--steps", default=None,
                     help="the column holding step numbers (default: 'step' when present)")
    rep.add_argument("--sort", default=None,
                     choices=("best_value", "checks", "stop_step", "patience", "min_delta"))
    rep.add_argument("--rows", type=int, default=20, help="rows to show (0: all; default 20)")
    rep.add_argument("--plot", default=None, metavar="PNG", help="write a plot of the sweep")
    rep.set_defaults(run=_replay)

    plot = commands.add_parser(
        "plot", help="plot a run's monitored metric with best, tolerance and stop markers",
        description="Plot the monitored metric over steps from RUN_DIR/history.jsonl, with "
        "the best checkpoint, the tolerance checkpoints and the stop marked.",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("-o", "--output", required=True, metavar="PNG")
    plot.add_argument("--metric", default=None, help="default: the metric the callbacks monitor")
    plot.set_defaults(run=_plot)
    return parser


def _fail(args: argparse.Namespace | None, message: str, prog: str | None = None) -> None:
    command = getattr(args, "command", None)
    prog = prog or (f"fcb {command}" if command else "fcb")
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)


_USER_ERRORS = (
    ConfigError,
    MissingMetricError,
    MetricTypeError,
    MetricShapeError,
    StateDictError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `fcb` command with `argv` (default: `sys.argv[1:]`); return the exit code.

    Errors print one line on stderr; a usage error returns 2:

    >>> from fcb.cli import main
    >>> main(["inspect", "no/such/run"])
    2
    >>> history = {"val_loss": [0.5, 0.4, 0.45, 0.41, 0.3]}
    >>> import csv, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "history.csv")
    >>> with open(path, "w", newline="") as f:
    ...     csv.writer(f).writerows([["val_loss"], *([v] for v in history["val_loss"])])
    >>> main([*f"replay {path} --monitor val_loss --patience 1:3".split()])
    replay: 3 configurations x 5 checks; best = lowest val_loss
    #  patience  min_delta  stop_step    reason  checks  best_step  best val_loss
    0         1          0          2  patience       3          1            0.4
    1         2          0          3  patience       4          1            0.4
    2         3          0      never         -       5          4            0.3
    <BLANKLINE>
    best val_loss: 0.3 at step 4 with patience=3, min_delta=0 (5 checks)
    trade-offs (fewer checks, or a better value):
      patience=1    min_delta=0            3 checks  best val_loss 0.4
      patience=3    min_delta=0            5 checks  best val_loss 0.3
    0
    """
    args: argparse.Namespace | None = None
    try:
        args = _parser().parse_args(argv)
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except UsageError as error:
        _fail(args, str(error), error.prog)
        return USAGE_EXIT
    except _USER_ERRORS as error:
        _fail(args, str(error))
        return USAGE_EXIT
    except CheckpointError as error:
        _fail(args, str(error))
        return CORRUPT_EXIT
    except KeyboardInterrupt:
        _fail(args, "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
