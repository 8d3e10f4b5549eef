"""Bad input to the adapters, and to the options of the callbacks other than EarlyStopping:
every case gets a clear error naming the key, field, file or directory, the value, and the
fix. The core's catalogue (EarlyStopping's options, metrics, state dicts, composition) is in
test_bad_input.py.

Together the two catalogues are the table in docs/reliability.md, generated from them:

    python tests/test_bad_input_adapters.py --write   # rewrite the table in the docs

`test_docs_table_is_the_catalogue` fails when the two drift apart.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fcb
import fcb.lightning
import fcb.orbax
import fcb.torch
from fcb import _files
from fcb._host.manifest import write_manifest

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "reliability.md")
START, END = "<!-- catalogue:start -->", "<!-- catalogue:end -->"

ES = fcb.EarlyStopping("val_loss", patience=3)


def base_chain(tolerances=(1, 3), monitor="val_loss", patience=3):
    return fcb.chain(
        fcb.EarlyStopping("val_loss", patience=patience),
        fcb.ModelCheckpoint("val_loss", save_last=True),
        fcb.BestCheckpoint(monitor, tolerances=tolerances),
    )


class Composite(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 1)


RUNNERS: dict[int, tuple[fcb.Callback, fcb.Runner]] = {}


def runner(chain):
    """One compiled dispatch per chain for the whole catalogue (compiling each case's
    adapter anew would take about a second each)."""
    if id(chain) not in RUNNERS:
        RUNNERS[id(chain)] = (chain, fcb.Runner(chain))  # the chain is kept: ids stay unique
    return RUNNERS[id(chain)][1]


def adapter(tmp, chain=ES, **kwargs):
    kwargs.setdefault("dirpath", str(tmp / "run"))
    made = fcb.torch.TorchAdapter(chain, **kwargs)
    made.runner = runner(chain)
    made.runner.state = chain.init()
    return made


def checked(metrics, chain=ES, step=0, **kwargs):
    """A Torch adapter's check of `metrics`."""

    def call(tmp):
        made = adapter(tmp, chain, **kwargs)
        try:
            made.on_validation_end(metrics, step=step)
        finally:
            made.on_exception()

    return call


def started(chain=ES, **kwargs):
    def call(tmp):
        made = adapter(tmp, chain, **kwargs)
        try:
            made.on_fit_start()
        finally:
            made.on_exception()

    return call


def built(**kwargs):
    return lambda tmp: fcb.torch.TorchAdapter(**{"callbacks": ES, **kwargs})


def two_writers(tmp):
    first = adapter(tmp)
    first.on_fit_start()
    try:
        started()(tmp)
    finally:
        first.on_fit_end()


def under_a_file(tmp):
    (tmp / "file").write_text("not a directory")
    started(dirpath=str(tmp / "file" / "checkpoints"))(tmp)


def is_a_file(tmp):
    (tmp / "file").write_text("not a directory")
    started(dirpath=str(tmp / "file"))(tmp)


# --- saved runs to resume from ------------------------------------------------------------


def saved_run(tmp, chain=None):
    """A short Torch run of `base_chain()` in tmp/saved; returns the directory."""
    chain = chain or base_chain()
    dirpath = tmp / "saved"
    made = adapter(tmp, chain, dirpath=str(dirpath), model=torch.nn.Linear(2, 1))
    made.on_fit_start()
    for step, value in enumerate([1.0, 0.5, 0.7]):
        made.on_validation_end({"val_loss": value}, step=step)
    made.on_fit_end()
    return dirpath


def resumed(chain=None, edit_state=None, edit_manifest=None, saved_chain=None, source=None):
    """Resume a saved run with `chain`, after editing its callbacks' state or manifest."""

    def call(tmp):
        dirpath = saved_run(tmp, saved_chain) if source is None else tmp / source
        if edit_state is not None:
            rewrite_resume_state(dirpath, edit_state)
        if edit_manifest is not None:
            with open(dirpath / "manifest.json") as f:
                manifest = json.load(f)
            edit_manifest(manifest)
            write_manifest(dirpath, manifest)  # sealed again, as fcb writes it
        made = adapter(
            tmp, chain or base_chain(), dirpath=str(tmp / "resumed"),
            model=torch.nn.Linear(2, 1), resume_from=str(dirpath),
        )
        try:
            made.on_fit_start()
        finally:
            made.on_exception()

    return call


def rewrite_resume_state(dirpath, edit):
    """Edit the callbacks' state dict inside the resume checkpoint, and record the file's
    new size and checksum (as a tool that rewrote it would): only the state is wrong."""
    with open(dirpath / "manifest.json") as f:
        manifest = json.load(f)
    path = dirpath / manifest["resume"]["file"]
    payload = torch.load(path, weights_only=True)
    state = json.loads(payload["fcb"]["callbacks"])
    edit(state)
    payload["fcb"]["callbacks"] = json.dumps(state)
    torch.save(payload, path)
    manifest["files"][manifest["resume"]["file"]] = _files.file_checksum(str(path))
    write_manifest(dirpath, manifest)  # sealed again, as fcb writes it


def set_version(state):
    state["version"] = 2


def set_dtype(state):
    state["state"]["leaves"]["[0].wait_count"]["dtype"] = "float32"


def set_storage(manifest):
    manifest["storage"] = "orbax"


# --- the orbax adapter ----------------------------------------------------------------------


def orbax_adapter(tmp, chain=ES, **kwargs):
    made = fcb.orbax.OrbaxAdapter(chain, str(tmp / "orbax"), async_save=False, **kwargs)
    made.runner = runner(chain)
    made.runner.state = chain.init()
    return made


def orbax_checked(metrics, chain=ES, step=0, state=None):
    def call(tmp):
        made = orbax_adapter(tmp, chain)
        try:
            made.on_validation_end(metrics, step=step, state=state or {"w": jnp.zeros(2)})
        finally:
            made.on_exception()

    return call


def orbax_saved(tmp, chain=None):
    made = orbax_adapter(tmp, chain or fcb.ModelCheckpoint("val_loss", save_last=True))
    made.on_fit_start()
    made.on_validation_end({"val_loss": 1.0}, step=0, state={"w": jnp.zeros(2)})
    made.on_fit_end()


def orbax_started(resume=False, saved_chain=None, directory="orbax"):
    def call(tmp):
        if saved_chain is not None:
            orbax_saved(tmp, saved_chain)
        chain = fcb.ModelCheckpoint("val_loss", save_last=True)
        made = fcb.orbax.OrbaxAdapter(chain, str(tmp / directory), resume=resume)
        try:
            made.on_fit_start()
        finally:
            made.on_exception()

    return call


def orbax_two_writers(tmp):
    first = orbax_adapter(tmp)
    first.on_fit_start()
    try:
        orbax_adapter(tmp).on_fit_start()
    finally:
        first.on_fit_end()


def orbax_resumes_a_torch_run(tmp):
    saved_run(tmp)
    made = fcb.orbax.OrbaxAdapter(base_chain(), str(tmp / "saved"), resume=True)
    try:
        made.on_fit_start()
    finally:
        made.on_exception()


def orbax_under_a_file(tmp):
    (tmp / "file").write_text("not a directory")
    made = fcb.orbax.OrbaxAdapter(ES, str(tmp / "file" / "run"))
    made.on_fit_start()


def orbax_built(callbacks=ES, **kwargs):
    def call(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the former option names
            return fcb.orbax.OrbaxAdapter(callbacks, str(tmp / "orbax"), **kwargs)

    return call


def lightning_built(callbacks=ES, **kwargs):
    return lambda tmp: fcb.lightning.FcbCallback(callbacks, **kwargs)


class NumpyTrainer:
    should_stop = False

    def state_dict(self):
        return {"epoch": 3, "rng": np.random.get_state()}

    def load_state_dict(self, state):
        pass


def load_run_directory(tmp):
    fcb.torch.load_checkpoint(saved_run(tmp))


NESTED = fcb.BestCheckpoint("val_loss", callbacks=[fcb.EarlyStopping("test_loss")])
SUBSET = fcb.BestCheckpoint("val_loss", model_names=["decoder"])



def made(callback, **kwargs):
    return lambda tmp: callback(**kwargs)


MC, BC = fcb.ModelCheckpoint, fcb.BestCheckpoint
RLR, TON, VRAM = fcb.ReduceLROnPlateau, fcb.TerminateOnNaN, fcb.VRAMDrift

# (case, input, build, error, message pattern)
CASES = [
    # --- configuration of the callbacks other than EarlyStopping (see test_bad_input.py) ---
    ("config: ModelCheckpoint save_top_k below -1", "save_top_k=-2", made(MC, save_top_k=-2),
     fcb.ConfigError,
     r"^ModelCheckpoint: `save_top_k` must be an integer >= -1 \(-1: keep all, 0: none, k: "
     r"the best k\), got save_top_k = -2\.$"),
    ("config: ModelCheckpoint filename with a slash", "filename='a/b'",
     made(MC, filename="a/b"), fcb.ConfigError,
     r"^ModelCheckpoint: `filename` must be a file name stem of letters, digits and '\._=\+-' "
     r"\(no '/' and no leading '\.'\), got filename = 'a/b'\.$"),
    ("config: ModelCheckpoint filename with a trailing newline", "filename='best\\n'",
     made(MC, filename="best\n"), fcb.ConfigError,
     r"^ModelCheckpoint: `filename` must be a file name stem .*got filename = 'best\\n'\.$"),
    ("config: ModelCheckpoint filename of 300 characters", "filename='b' * 300",
     made(MC, filename="b" * 300), fcb.ConfigError,
     r"^ModelCheckpoint: `filename` must be at most 120 characters, got 300"),
    ("config: BestCheckpoint metric key that cannot name a file", "metric_key='val loss'",
     lambda tmp: BC("val loss"), fcb.ConfigError,
     r"^BestCheckpoint: `metric_key` = 'val loss' cannot name the default slot "
     r"'best\.<metric_key>' .*pass filename=\.\.\. to name the slot\.$"),
    ("config: ModelCheckpoint unknown mode", "mode='low'", made(MC, mode="low"),
     fcb.ConfigError, r"^ModelCheckpoint: `mode` must be 'min' or 'max', got mode = 'low'\.$"),
    ("config: ModelCheckpoint save_last a string", "save_last='no'",
     made(MC, save_last="no"), fcb.ConfigError,
     r"^ModelCheckpoint: `save_last` must be True or False, got save_last = 'no'\.$"),
    ("config: EarlyStopping strict a string", "strict='False'",
     lambda tmp: fcb.EarlyStopping("val_loss", strict="False"), fcb.ConfigError,
     r"^EarlyStopping: `strict` must be True or False, got strict = 'False'\.$"),
    ("config: BestCheckpoint negative tolerance", "tolerances=[-1]",
     made(BC, metric_key="val_loss", tolerances=[-1]), fcb.ConfigError,
     r"^BestCheckpoint: every tolerance must be an integer >= 0, got -1 in tolerances = "
     r"\(-1,\)\.$"),
    ("config: BestCheckpoint repeated tolerance", "tolerances=[3, 3]",
     made(BC, metric_key="val_loss", tolerances=[3, 3]), fcb.ConfigError,
     r"^BestCheckpoint: `tolerances` must be strictly increasing \(sorted, no duplicates\), "
     r"got tolerances = \(3, 3\); pass \(3,\)\.$"),
    ("config: BestCheckpoint every_n 0", "every_n=0",
     made(BC, metric_key="val_loss", every_n=0), fcb.ConfigError,
     r"^BestCheckpoint: `every_n` must be an integer >= 1, got every_n = 0\.$"),
    ("config: BestCheckpoint check_finite a string", "check_finite='yes'",
     made(BC, metric_key="val_loss", check_finite="yes"), fcb.ConfigError,
     r"^BestCheckpoint: `check_finite` must be True or False, got check_finite = 'yes'\.$"),
    ("config: ReduceLROnPlateau factor above 1", "factor=1.5", made(RLR, factor=1.5),
     fcb.ConfigError,
     r"^ReduceLROnPlateau: `factor` must be a finite number in \(0\.0, 1\.0\), got factor = "
     r"1\.5\. The new learning rate is lr \* factor"),
    ("config: ReduceLROnPlateau factor 0", "factor=0.0", made(RLR, factor=0.0),
     fcb.ConfigError, r"`factor` must be a finite number in \(0\.0, 1\.0\), got factor = 0\.0\."),
    ("config: ReduceLROnPlateau negative min_lr", "min_lr=-1.0", made(RLR, min_lr=-1.0),
     fcb.ConfigError,
     r"^ReduceLROnPlateau: `min_lr` must be a finite number >= 0\.0, got min_lr = -1\.0\.$"),
    ("config: ReduceLROnPlateau negative cooldown", "cooldown=-1", made(RLR, cooldown=-1),
     fcb.ConfigError,
     r"^ReduceLROnPlateau: `cooldown` must be an integer >= 0, got cooldown = -1\.$"),
    ("config: ReduceLROnPlateau unknown threshold_mode", "threshold_mode='absolute'",
     made(RLR, threshold_mode="absolute"), fcb.ConfigError,
     r"^ReduceLROnPlateau: `threshold_mode` must be 'abs' or 'rel', got threshold_mode = "
     r"'absolute'\.$"),
    ("config: ReduceLROnPlateau negative threshold", "threshold=-0.1",
     made(RLR, threshold=-0.1), fcb.ConfigError,
     r"`threshold` must be a finite number >= 0\.0, got threshold = -0\.1\. The sign is set "
     r"by `mode`"),
    ("config: TerminateOnNaN no keys", "keys=()", made(TON, keys=()), fcb.ConfigError,
     r"^TerminateOnNaN: `keys` must be a non-empty sequence of metric names, got keys = "
     r"\(\)\."),
    ("config: VRAMDrift fraction above 1", "max_drift_fraction=1.5",
     made(VRAM, max_drift_fraction=1.5), fcb.ConfigError,
     r"^VRAMDrift: `max_drift_fraction` must be a finite number in \[0\.0, 1\.0\), got "
     r"max_drift_fraction = 1\.5\."),
    ("config: VRAMDrift without a threshold", "VRAMDrift()", made(VRAM), fcb.ConfigError,
     r"^VRAMDrift: give `max_drift_bytes` and/or `max_drift_fraction`, got neither\."),
    # --- metrics given to fcb.torch.TorchAdapter ---
    ("torch: tensor metric with 3 values", "{'val_loss': torch.ones(3)}",
     checked({"val_loss": torch.ones(3)}), fcb.MetricShapeError,
     r"^TorchAdapter: metric 'val_loss' must be a scalar, got a tensor of shape \(3,\)\. "
     r"Reduce it first, e.g\. x\.mean\(\)\.$"),
    ("torch: 2-D tensor metric", "{'val_loss': torch.ones(2, 2)}",
     checked({"val_loss": torch.ones(2, 2)}), fcb.MetricShapeError,
     r"metric 'val_loss' must be a scalar, got a tensor of shape \(2, 2\)"),
    ("torch: empty tensor metric", "{'val_loss': torch.ones(0)}",
     checked({"val_loss": torch.ones(0)}), fcb.MetricShapeError,
     r"metric 'val_loss' must be a scalar, got a tensor of shape \(0,\)"),
    ("torch: list metric", "{'val_loss': [0.5, 0.4]}", checked({"val_loss": [0.5, 0.4]}),
     fcb.MetricShapeError, r"metric 'val_loss' must be a scalar, got shape \(2,\)"),
    ("torch: string metric", "{'val_loss': '0.5'}", checked({"val_loss": "0.5"}),
     fcb.MetricTypeError,
     r"metric 'val_loss' must be a real scalar, got str: '0\.5'\. Log a number, e\.g\. "
     r"float\(loss\)\."),
    ("torch: None metric", "{'val_loss': None}", checked({"val_loss": None}),
     fcb.MetricTypeError, r"metric 'val_loss' must be a real scalar, got NoneType: None\."),
    ("torch: complex tensor metric", "{'val_loss': torch.tensor(1+2j)}",
     checked({"val_loss": torch.tensor(1 + 2j)}), fcb.MetricTypeError,
     r"metric 'val_loss' must be a real scalar, got dtype complex"),
    ("torch: monitored key missing", "{'loss': 1.0}", checked({"loss": 1.0}),
     fcb.MissingMetricError,
     r"^EarlyStopping: the monitored metric 'val_loss' is not in the metrics of this check; "
     r"available keys: \['loss'\]\."),
    ("torch: metrics not a mapping", "[0.5]", checked([0.5]), fcb.MetricTypeError,
     r"^TorchAdapter: metrics must be a mapping from name to scalar, got list: \[0\.5\]\. "
     r"Pass a dict"),
    ("torch: metrics a bare number", "0.5", checked(0.5), fcb.MetricTypeError,
     r"^TorchAdapter: metrics must be a mapping from name to scalar, got float: 0\.5\."),
    ("torch: negative step", "step=-1", checked({"val_loss": 1.0}, step=-1), fcb.ConfigError,
     r"^TorchAdapter: `step` must be an integer >= 0, got step = -1\.$"),
    ("torch: fractional step", "step=1.5", checked({"val_loss": 1.0}, step=1.5),
     fcb.ConfigError, r"`step` must be an integer >= 0, got step = 1\.5\."),
    ("torch: string step", "step='3'", checked({"val_loss": 1.0}, step="3"), fcb.ConfigError,
     r"`step` must be an integer >= 0, got step = '3'\."),
    ("torch: evaluate returns a number", "evaluate=lambda model: 0.1",
     checked({"val_loss": 1.0}, NESTED, model=torch.nn.Linear(1, 1),
             evaluate=lambda model: 0.1),
     fcb.MetricTypeError,
     r"^TorchAdapter: the evaluate function for 'best\.val_loss' must return a mapping from "
     r"metric name to scalar, got float: 0\.1\."),
    ("torch: evaluate returns a string metric", "evaluate=lambda model: {'test_loss': 'low'}",
     checked({"val_loss": 1.0}, NESTED, model=torch.nn.Linear(1, 1),
             evaluate=lambda model: {"test_loss": "low"}),
     fcb.MetricTypeError, r"metric 'test_loss' must be a real scalar, got str: 'low'"),
    # --- adapter options ---
    ("torch: unknown check_on", "check_on='epoch'", built(check_on="epoch"), fcb.ConfigError,
     r"^TorchAdapter: `check_on` must be 'validation_end' or 'train_epoch_end', got "
     r"check_on = 'epoch'\.$"),
    ("torch: model not a Module", "model={'w': tensor}", built(model={"w": torch.ones(1)}),
     fcb.ConfigError, r"^TorchAdapter: `model` must be a torch\.nn\.Module, got dict\.$"),
    ("torch: callbacks not an fcb.Callback", "callbacks='EarlyStopping'",
     built(callbacks="EarlyStopping"), fcb.ConfigError,
     r"^TorchAdapter: `callbacks` must be an fcb\.Callback \(or fcb\.chain\(\.\.\.\)\), got "
     r"str: 'EarlyStopping'\.$"),
    ("torch: unknown reduce", "reduce='median'", built(reduce="median"), fcb.ConfigError,
     r"^TorchAdapter: `reduce` must be one of .* or None \(metrics already reduced\), got "
     r"reduce = 'median'\.$"),
    ("torch: background a string", "background='False'", built(background="False"),
     fcb.ConfigError,
     r"^TorchAdapter: `background` must be True or False, got background = 'False'\.$"),
    ("torch: history a string", "history='no'", built(history="no"), fcb.ConfigError,
     r"^TorchAdapter: `history` must be True or False, got history = 'no'\.$"),
    ("torch: optimizer a Module", "optimizer=torch.nn.Linear(1, 1)",
     built(optimizer=torch.nn.Linear(1, 1)), fcb.ConfigError,
     r"^TorchAdapter: `optimizer` must be a torch\.optim\.Optimizer, got Linear\.$"),
    ("torch: evaluate not a function", "evaluate=3", built(evaluate=3), fcb.ConfigError,
     r"^TorchAdapter: `evaluate` must be a function of the model or a mapping from request "
     r"name to one, got int: 3\.$"),
    ("torch: evaluate mapping to a number", "evaluate={'best.val_loss': 3}",
     built(evaluate={"best.val_loss": 3}), fcb.ConfigError,
     r"^TorchAdapter: `evaluate\['best\.val_loss'\]` must be a function of the model, got "
     r"int: 3\.$"),
    ("torch: log not a function", "log=3", built(log=3), fcb.ConfigError,
     r"^TorchAdapter: `log` must be a function \(step, scalars\) -> None, got int: 3\.$"),
    ("torch: scheduler without a state dict", "scheduler=3", built(scheduler=3),
     fcb.ConfigError,
     r"^TorchAdapter: `scheduler` must have state_dict\(\) and load_state_dict\(\) \(its state "
     r"is saved and restored with the model\), got int without state_dict\(\) and "
     r"load_state_dict\(\)\.$"),
    ("torch: trainer without should_stop", "trainer=3", built(trainer=3), fcb.ConfigError,
     r"^TorchAdapter: `trainer` must have a `should_stop` attribute \(fcb sets it when a "
     r"callback stops the run\), got int: 3\.$"),
    ("torch: dirpath not a path", "dirpath=3", built(dirpath=3), fcb.ConfigError,
     r"^TorchAdapter: `dirpath` must be a non-empty path or None, got dirpath = 3\.$"),
    ("torch: resume_from not a path", "resume_from=3", built(resume_from=3), fcb.ConfigError,
     r"^TorchAdapter: `resume_from` must be a non-empty path or None, got resume_from = 3\.$"),
    ("torch: state dict holding a NumPy array",
     "trainer.state_dict() = {'rng': np.random.get_state()}",
     checked({"val_loss": 1.0}, fcb.ModelCheckpoint("val_loss"), trainer=NumpyTrainer()),
     fcb.CheckpointWriteError,
     r"^TorchAdapter: the checkpoint of step 0 is not written: trainer\.state_dict\(\)\['rng'\]"
     r"\[1\] holds a numpy\.ndarray, which torch\.load\(weights_only=True\) refuses"),
    ("torch: load_checkpoint of a run directory", "load_checkpoint(run_dir)",
     load_run_directory, fcb.ConfigError,
     r"^load_checkpoint: .*saved is a directory; pass the path of one of its checkpoints in "
     r".*saved: best\.val_loss\.pt, best\.val_loss\.tolerance=1\.pt, "
     r"best\.val_loss\.tolerance=3\.pt, best_model\.pt, last\.pt\.$"),
    ("torch: no checkpoint directory", "no dirpath, trainer or ModelCheckpoint(dirpath=...)",
     started(dirpath=None), fcb.ConfigError,
     r"^TorchAdapter: no checkpoint directory: pass dirpath=\.\.\., set a ModelCheckpoint's "
     r"dirpath, or give a trainer with default_root_dir\.$"),
    ("torch: model without the named submodule",
     "model_names=['decoder'], model with encoder, head",
     started(SUBSET, model=Composite()), fcb.ConfigError,
     r"^TorchAdapter: model_names asks for submodule 'decoder', but the model \(Composite\) "
     r"has \['encoder', 'head'\]\. Fix model_names\.$"),
    ("torch: model_names without a model", "model_names=['decoder'], no model",
     started(SUBSET), fcb.ConfigError,
     r"the callbacks save the submodules \['decoder'\] but no model was given; pass model="),
    ("torch: evaluation requested, no evaluate function", "BestCheckpoint(callbacks=[...])",
     checked({"val_loss": 1.0}, NESTED, model=torch.nn.Linear(1, 1)), fcb.ConfigError,
     r"^TorchAdapter: the callbacks ask to evaluate the model for 'best\.val_loss', but no "
     r"evaluate function was given\. Pass evaluate=\{'best\.val_loss': fn\} where fn\(model\) "
     r"returns a dict of metrics"),
    ("torch: evaluate mapping without the request", "evaluate={'other': fn}",
     checked({"val_loss": 1.0}, NESTED, model=torch.nn.Linear(1, 1),
             evaluate={"other": lambda model: {}}),
     fcb.ConfigError, r"Pass evaluate=\{'best\.val_loss': fn\}"),
    # --- the checkpoint directory ---
    ("torch: two writers on one directory", "two adapters, one dirpath", two_writers,
     fcb.DirectoryInUseError,
     r"run is being written by another fcb adapter \(process \d+\)\. Give this run its own "
     r"directory \(dirpath=\.\.\.\), or close the other adapter first\.$"),
    ("torch: dirpath under a regular file", "dirpath='file/checkpoints'", under_a_file,
     fcb.CheckpointWriteError,
     r"^cannot create the checkpoint directory .*file/checkpoints: Not a directory\. Pass a "
     r"writable dirpath\.$"),
    ("torch: dirpath is a regular file", "dirpath='file'", is_a_file, fcb.CheckpointWriteError,
     r"^cannot create the checkpoint directory .*file: Not a directory\. Pass a writable "
     r"dirpath\.$"),
    # --- resuming ---
    ("torch: resume, no resume point", "resume_from=run without a 'last' slot",
     resumed(saved_chain=fcb.chain(fcb.ModelCheckpoint("val_loss", save_last=False))),
     fcb.CheckpointCorruptError,
     r"saved has no resumable checkpoint: resuming needs a `last` slot, e.g\. "
     r"fcb\.ModelCheckpoint\(save_last=True\) in the chain\.$"),
    ("torch: resume from a directory that is no run", "resume_from=empty directory",
     resumed(source="."), fcb.CheckpointCorruptError,
     r"manifest\.json does not exist: not an fcb run directory"),
    ("torch: resume from an orbax run", "resume_from=run written by fcb.orbax",
     resumed(edit_manifest=set_storage), fcb.CheckpointCorruptError,
     r"manifest\.json belongs to a run written by fcb\.orbax; open it with fcb\.orbax, not "
     r"fcb\.torch\.$"),
    ("torch: resume into another callback type", "saved chain, resumed ModelCheckpoint",
     resumed(chain=fcb.ModelCheckpoint("val_loss", save_last=True)), fcb.StateDictError,
     r"^ModelCheckpoint: the state dict belongs to a Chain callback and cannot be loaded into "
     r"ModelCheckpoint\."),
    ("torch: resume with a callback fewer", "saved 3 callbacks, resumed 2",
     resumed(chain=fcb.chain(fcb.EarlyStopping("val_loss"),
                             fcb.ModelCheckpoint("val_loss", save_last=True))),
     fcb.StateDictError,
     r"the saved state has structure '\(EarlyStoppingState, ModelCheckpointState, "
     r"BestCheckpointState\)', this callback's state has '\(EarlyStoppingState, "
     r"ModelCheckpointState\)'"),
    ("torch: resume with fewer tolerances", "saved tolerances=(1, 3), resumed (1,)",
     resumed(chain=base_chain(tolerances=(1,))), fcb.StateDictError,
     r"\[2\]\.tolerances\.best: shape \(2,\), expected \(1,\)"),
    ("torch: resume with another monitor", "saved 'val_loss', resumed 'loss'",
     resumed(chain=base_chain(monitor="loss")), fcb.StateDictError,
     r"saved with other identity options \(callbacks\[2\]\.metric_key was 'val_loss', is now "
     r"'loss'"),
    ("torch: resume a state of another format version", "state dict version 2",
     resumed(edit_state=set_version), fcb.StateDictError,
     r"the state dict has format version 2; this fcb reads version 1\."),
    ("torch: resume a state with a wrong dtype", "wait_count saved as float32",
     resumed(edit_state=set_dtype), fcb.StateDictError,
     r"\[0\]\.wait_count: dtype float32, expected int32"),
    # --- fcb.orbax.OrbaxAdapter ---
    ("orbax: non-scalar metric", "{'val_loss': np.zeros(3)}",
     orbax_checked({"val_loss": np.zeros(3)}), fcb.MetricShapeError,
     r"metric 'val_loss' must be a scalar, got shape \(3,\)"),
    ("orbax: monitored key missing", "{'loss': 1.0}", orbax_checked({"loss": 1.0}),
     fcb.MissingMetricError, r"available keys: \['loss'\]"),
    ("orbax: negative step", "step=-1", orbax_checked({"val_loss": 1.0}, step=-1),
     fcb.ConfigError,
     r"^OrbaxAdapter: `step` must be an integer >= 0 \(it names the orbax step\), got "
     r"step = -1\.$"),
    ("orbax: model without the named submodule",
     "model_names=['decoder'], state {'model': {'encoder': ...}}",
     orbax_checked({"val_loss": 1.0}, SUBSET, state={"model": {"encoder": jnp.zeros(2)}}),
     fcb.ConfigError,
     r"OrbaxAdapter: model_names asks for submodule 'decoder', but the model \(dict\) has "
     r"\['encoder'\]\. Fix model_names\."),
    ("orbax: empty directory name", "dirpath=''",
     lambda tmp: fcb.orbax.OrbaxAdapter(ES, ""), fcb.ConfigError,
     r"^OrbaxAdapter: `dirpath` must be a non-empty path, got dirpath = ''\.$"),
    ("orbax: two writers on one directory", "two adapters, one directory", orbax_two_writers,
     fcb.DirectoryInUseError, r"orbax is being written by another fcb adapter"),
    ("orbax: evaluate not a function", "evaluate=3",
     lambda tmp: fcb.orbax.OrbaxAdapter(ES, str(tmp), evaluate=3), fcb.ConfigError,
     r"^OrbaxAdapter: `evaluate` must be a function of the state or a mapping from request "
     r"name to one, got int: 3\.$"),
    ("orbax: evaluate mapping to a number", "evaluate={'best.val_loss': 3}",
     orbax_built(evaluate={"best.val_loss": 3}), fcb.ConfigError,
     r"^OrbaxAdapter: `evaluate\['best\.val_loss'\]` must be a function of the state, got "
     r"int: 3\.$"),
    ("orbax: callbacks None", "OrbaxAdapter(None)", lambda tmp: fcb.orbax.OrbaxAdapter(None),
     fcb.ConfigError,
     r"^OrbaxAdapter: `callbacks` must be an fcb\.Callback \(or fcb\.chain\(\.\.\.\)\), got "
     r"NoneType: None\.$"),
    ("orbax: log not a function", "log=3", orbax_built(log=3), fcb.ConfigError,
     r"^OrbaxAdapter: `log` must be a function \(step, scalars\) -> None, got int: 3\.$"),
    ("orbax: resume_from not a path", "resume_from=3", orbax_built(resume_from=3),
     fcb.ConfigError,
     r"^OrbaxAdapter: `resume_from` must be a non-empty path or None, got resume_from = 3\.$"),
    ("orbax: background a string", "background='False'", orbax_built(background="False"),
     fcb.ConfigError,
     r"^OrbaxAdapter: `background` must be True or False, got background = 'False'\.$"),
    ("orbax: async_save a string", "async_save='False'", orbax_built(async_save="False"),
     fcb.ConfigError,
     r"^OrbaxAdapter: `async_save` must be True or False, got async_save = 'False'\.$"),
    ("orbax: resume a string", "resume='False'", orbax_built(resume="False"), fcb.ConfigError,
     r"^OrbaxAdapter: `resume` must be True or False, got resume = 'False'\.$"),
    ("orbax: history a string", "history='no'", orbax_built(history="no"), fcb.ConfigError,
     r"^OrbaxAdapter: `history` must be True or False, got history = 'no'\.$"),
    # --- fcb.lightning.FcbCallback ---
    ("lightning: callbacks None", "FcbCallback(None)", lightning_built(None), fcb.ConfigError,
     r"^FcbCallback: `callbacks` must be an fcb\.Callback \(or fcb\.chain\(\.\.\.\)\), got "
     r"NoneType: None\.$"),
    ("lightning: history a string", "history='no'", lightning_built(history="no"),
     fcb.ConfigError,
     r"^FcbCallback: `history` must be True or False, got history = 'no'\.$"),
    ("lightning: evaluate not a function", "evaluate=3", lightning_built(evaluate=3),
     fcb.ConfigError,
     r"^FcbCallback: `evaluate` must be a function of the model or a mapping from request "
     r"name to one, got int: 3\.$"),
    ("lightning: log not a function", "log=3", lightning_built(log=3), fcb.ConfigError,
     r"^FcbCallback: `log` must be a function \(step, scalars\) -> None, got int: 3\.$"),
    ("lightning: dirpath not a path", "dirpath=3", lightning_built(dirpath=3), fcb.ConfigError,
     r"^FcbCallback: `dirpath` must be a non-empty path or None, got dirpath = 3\.$"),
    ("orbax: unknown reduce", "reduce='median'",
     lambda tmp: fcb.orbax.OrbaxAdapter(ES, str(tmp), reduce="median"), fcb.ConfigError,
     r"^OrbaxAdapter: `reduce` must be one of \('mean', 'sum', 'max', 'min'\) or None "
     r"\(metrics already reduced\), got reduce = 'median'\.$"),
    ("orbax: timeout not positive", "timeout=0",
     lambda tmp: fcb.orbax.OrbaxAdapter(ES, str(tmp), timeout=0), fcb.ConfigError,
     r"^OrbaxAdapter: `timeout` must be a finite number of seconds > 0, got timeout = 0\.$"),
    ("orbax: timeout infinite", "timeout=float('inf')",
     lambda tmp: fcb.orbax.OrbaxAdapter(ES, str(tmp), timeout=float("inf")), fcb.ConfigError,
     r"^OrbaxAdapter: `timeout` must be a finite number of seconds > 0, got timeout = inf\.$"),
    ("orbax: timeout not a number", "timeout='60'",
     lambda tmp: fcb.orbax.OrbaxAdapter(ES, str(tmp), timeout="60"), fcb.ConfigError,
     r"^OrbaxAdapter: `timeout` must be a finite number of seconds > 0, got timeout = '60'\.$"),
    ("orbax: resume, no resume point", "resume=True, run without a 'last' slot",
     orbax_started(resume=True, saved_chain=fcb.ModelCheckpoint("val_loss", save_last=False)),
     fcb.CheckpointCorruptError, r"has no resumable checkpoint: resuming needs a `last` slot"),
    ("orbax: resume a Torch run", "resume=True on a fcb.torch run directory",
     orbax_resumes_a_torch_run, fcb.CheckpointCorruptError,
     r"belongs to a run written by fcb\.torch; open it with fcb\.torch, not fcb\.orbax"),
    ("orbax: directory under a regular file", "dirpath='file/run'", orbax_under_a_file,
     fcb.CheckpointWriteError,
     r"^cannot create the checkpoint directory .*file/run: Not a directory\. Pass a writable "
     r"dirpath\.$"),
]


@pytest.mark.parametrize(
    ("build", "error", "match"), [c[2:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(tmp_path, build, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fcb.ConfigChangedWarning)
        with pytest.raises(error, match=match):
            build(tmp_path)


# --- a refused check uses up no step ---------------------------------------------------------


def failing_write(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("kind", ["torch", "orbax"])
def test_a_check_that_raises_uses_up_no_step(tmp_path, monkeypatch, kind):
    """An unnumbered check is the previous step + 1: a check that raised did not happen, so
    the next one takes its step (a bad metric, or a write that failed)."""
    chain = fcb.ModelCheckpoint("val_loss", save_last=True)
    if kind == "torch":
        made = adapter(tmp_path, chain, model=torch.nn.Linear(1, 1))
        check = made.on_validation_end
        store = fcb.torch.CheckpointStore
    else:
        made = orbax_adapter(tmp_path, chain)

        def check(metrics):
            return made.on_validation_end(metrics, state={"w": jnp.zeros(2)})

        store = fcb.orbax._store.OrbaxStore
    check({"val_loss": 1.0})  # step 0
    with pytest.raises(fcb.MissingMetricError):
        check({"loss": 1.0})
    with pytest.raises(fcb.MetricTypeError):
        check({"val_loss": "low"})
    with monkeypatch.context() as patched:
        patched.setattr(store, "write" if kind == "torch" else "save", failing_write)
        with pytest.raises((fcb.CheckpointWriteError, OSError)):
            check({"val_loss": 0.5})
    check({"val_loss": 0.5})
    assert made.slots == {"best_model": 1, "last": 1}
    made.on_fit_end()


# --- inputs that are accepted, with a documented outcome -------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_metric_outcomes(tmp_path, value):
    """NaN and ±inf are never compared as numbers (a -inf loss is not a new best): each
    callback has its documented outcome (docs/reliability.md)."""

    def second_check(callback):
        made = adapter(tmp_path, callback, dirpath=str(tmp_path / f"{len(os.listdir(tmp_path))}"),
                       model=torch.nn.Linear(1, 1))
        made.on_fit_start()
        made.on_validation_end({"val_loss": 1.0}, step=0)
        actions = made.on_validation_end({"val_loss": value}, step=1)
        made.on_fit_end()
        return made, actions

    made, actions = second_check(fcb.EarlyStopping("val_loss", patience=3))
    assert made.should_stop and "NaN or infinite (check_finite=True)" in made.stop_message
    made, actions = second_check(fcb.EarlyStopping("val_loss", patience=3, check_finite=False))
    assert not made.should_stop
    _, actions = second_check(fcb.ModelCheckpoint("val_loss", save_last=True))
    assert {k: int(v) for k, v in actions.slots.items()} == {"best_model": 0, "last": 1}
    _, actions = second_check(fcb.BestCheckpoint("val_loss", tolerances=(1,)))
    assert int(actions.slots["best.val_loss"]) == 0
    assert bool(actions.events["best.val_loss/tolerance_exceeded"])
    _, actions = second_check(fcb.ReduceLROnPlateau("val_loss", patience=0, factor=0.5))
    assert float(actions.lr_scale) == 0.5
    made, _ = second_check(fcb.TerminateOnNaN(("val_loss",)))
    assert made.should_stop and "NaN or infinite (TerminateOnNaN)" in made.stop_message


def test_tensor_with_grad_is_accepted_and_detached(tmp_path):
    made = adapter(tmp_path, fcb.ModelCheckpoint("val_loss", save_last=True),
                   model=torch.nn.Linear(1, 1))
    loss = (torch.ones(1, requires_grad=True) * 0.5).sum()
    made.on_validation_end({"val_loss": loss}, step=0)
    made.on_fit_end()
    with open(tmp_path / "run" / "manifest.json") as f:
        assert json.load(f)["slots"]["best_model"]["value"] == 0.5


def test_changed_hyperparameters_on_resume_warn_and_the_current_config_wins(tmp_path):
    dirpath = saved_run(tmp_path)
    made = adapter(tmp_path, base_chain(tolerances=(1, 5), patience=5),
                   dirpath=str(dirpath), model=torch.nn.Linear(2, 1), resume_from=str(dirpath))
    with pytest.warns(fcb.ConfigChangedWarning) as caught:
        made.on_fit_start()
    made.on_fit_end()
    messages = " ".join(str(w.message) for w in caught)
    assert "callbacks[0].config.patience = 3, the current config has" in messages
    assert "callbacks[2].config.tolerances = [1, 3], the current config has" in messages


# --- the catalogue table in the docs ---------------------------------------------------------


def readable(pattern):
    """A regular expression of a message as the text it matches (`…` for any text)."""
    text = pattern.removeprefix("^").removesuffix("$")
    text = text.replace(".*", "…").replace(r"\d+", "N")
    return re.sub(r"\\(.)", r"\1", text)


def cell(text):
    return text.replace("|", r"\|").replace("\n", " ")


def core_input(pattern):
    """The core catalogue has no input column: the value its message quotes, if any (the
    case's name says the rest)."""
    got = re.search(r"got (.*?)(?:\. |\.?$)", readable(pattern))
    return f"`{cell(got.group(1))}`" if got and "…" not in got.group(1) else "-"


def error_name(error):
    return f"fcb.{error.__name__}" if error.__module__ == "fcb" else error.__name__


def catalogue_rows():
    import test_bad_input

    rows = [
        ("core: " + name, core_input(match), error_name(error), readable(match))
        for name, _, error, match in test_bad_input.CASES
    ]
    rows += [
        (name, f"`{cell(given)}`", error_name(error), readable(match))
        for name, given, _, error, match in CASES
    ]
    return rows


def catalogue_table():
    lines = ["| case | input | error | message (excerpt) |", "|---|---|---|---|"]
    for name, given, error, message in catalogue_rows():
        # brackets escaped: `x['a'][1]` would read as a Markdown reference link
        shown = cell(message).replace("[", r"\[").replace("]", r"\]")
        lines.append(f"| {cell(name)} | {given} | `{error}` | {shown} |")
    return "\n".join(lines)


def test_docs_table_is_the_catalogue():
    with open(DOCS) as f:
        text = f.read()
    table = text.split(START)[1].split(END)[0].strip()
    assert table == catalogue_table(), (
        "docs/reliability.md is out of date: python tests/test_bad_input_adapters.py --write"
    )
    assert len(catalogue_rows()) >= 40


def write_docs_table():
    with open(DOCS) as f:
        text = f.read()
    before, rest = text.split(START)
    after = rest.split(END)[1]
    with open(DOCS, "w") as f:
        f.write(f"{before}{START}\n{catalogue_table()}\n{END}{after}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    if "--write" in sys.argv:
        write_docs_table()
    else:
        print(catalogue_table())
