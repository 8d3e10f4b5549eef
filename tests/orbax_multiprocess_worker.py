"""One process of a tiny data-parallel JAX run with fcb.orbax (launched twice by
test_orbax_multiprocess.py; the processes meet through `jax.distributed.initialize`).

    python tests/orbax_multiprocess_worker.py DIR SCENARIO OUT PORT PROCESS_ID
SCENARIO: train | partial | resume | nan | fail_orbax | fail_manifest. Appends one JSON line
per check to OUT/process{id}.jsonl.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import fcb
import fcb.orbax
from fcb import _files


def main(directory: str, scenario: str, out: str, port: int, process_id: int) -> int:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    log = open(os.path.join(out, f"process{process_id}.jsonl"), "a")

    def emit(line: dict) -> None:
        log.write(json.dumps(line) + "\n")
        log.flush()

    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    by_example = NamedSharding(mesh, PartitionSpec("data"))

    def global_replicated(value: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(value.shape, replicated, lambda index: value[index])

    generator = np.random.default_rng(99)
    x = generator.standard_normal((128, 6)).astype(np.float32)
    y = (x @ generator.standard_normal((6, 1)) + generator.standard_normal((128, 1))).astype(
        np.float32
    )
    shard = slice(process_id * 32, (process_id + 1) * 32)  # each process's own examples
    x_train = jax.make_array_from_process_local_data(by_example, x[:64][shard])
    y_train = jax.make_array_from_process_local_data(by_example, y[:64][shard])
    x_val, y_val = x[64:][shard], y[64:][shard]

    def loss(params, xb, yb):
        return jnp.mean((xb @ params["w"] + params["b"] - yb) ** 2)

    @jax.jit
    def train_step(params, xb, yb):  # the gradient is the mean over both processes' examples
        grads = jax.grad(loss)(params, xb, yb)
        return jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, params, grads)

    template = {
        "w": global_replicated(np.zeros((6, 1), np.float32)),
        "b": global_replicated(np.zeros((1,), np.float32)),
    }
    chain = fcb.chain(
        fcb.TerminateOnNaN(keys=("val_loss",)),
        fcb.EarlyStopping("val_loss", patience=3),
        fcb.ModelCheckpoint("val_loss", save_top_k=2, save_last=True),
    )
    adapter = fcb.orbax.OrbaxAdapter(
        chain,
        directory,
        resume_from=directory if scenario == "resume" else None,
        timeout=10 if scenario.startswith("fail") else 120,  # orbax's barrier timeout
    )
    adapter.on_fit_start(like={"params": template})
    params = template if adapter.restored_state is None else adapter.restored_state["params"]
    start = 0 if adapter.resumed_step is None else adapter.resumed_step + 1
    stop_after = 4 if scenario == "partial" else None
    for step in range(start, 60):
        params = train_step(params, x_train, y_train)
        host = {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}
        val_loss = float(np.mean((x_val @ host["w"] + host["b"] - y_val) ** 2))
        if scenario == "nan" and process_id == 1 and step == 3:
            val_loss = float("nan")
        if scenario == "fail_orbax" and process_id == 0 and step == 2:
            from orbax.checkpoint._src.handlers import json_checkpoint_handler

            async def fail(*_args, **_kwargs):
                raise OSError(errno.EIO, "Input/output error")

            json_checkpoint_handler.JsonCheckpointHandler._save_fn = fail
        if scenario == "fail_manifest" and process_id == 0 and step == 2:

            def fail_fsync(*_args, **_kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            _files.os.fsync = fail_fsync  # type: ignore[attr-defined]
        started = time.perf_counter()
        try:
            actions = adapter.on_validation_end(
                {"val_loss": val_loss}, step=step, state={"params": params}
            )
            adapter.wait()  # the failure of this step's save surfaces here, not a step later
        except fcb.CheckpointWriteError as error:
            seconds = time.perf_counter() - started
            emit({"process": process_id, "step": step, "error": str(error), "seconds": seconds})
            adapter.on_exception(error)
            return 0
        emit(
            {
                "process": process_id,
                "step": step,
                "stop": adapter.should_stop,
                "reason": int(actions.stop_reason),
                "slots": {k: int(v) for k, v in actions.slots.items()},
                "val_loss": val_loss,
            }
        )
        if adapter.should_stop or (stop_after is not None and step >= stop_after):
            break
    adapter.on_fit_end()
    host = {k: np.asarray(v.addressable_data(0)).ravel().tolist() for k, v in params.items()}
    emit({"process": process_id, "done": True, "weights": host})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
