"""The Torch adapter's writes and resume reads, single-file or sharded (a mixin of
`TorchAdapter`: the engine methods `write`, `snapshot`, `read_resume` and `adopt`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import IO, Any

from .._host.engine import Check
from .._host.store import ManifestStore
from ._payload import (
    adopt_files,
    open_resume_point,
    read_resume_point,
    restore_payload,
    step_payload,
)
from ._sharded import ShardedStore, is_sharded
from ._sharded_payload import _copies, adopt_sharded, read_sharded_resume, sharded_step
from ._store import CheckpointStore
from ._writer import BackgroundWriter, host_copy


class TorchWrites:
    """What a step's checkpoint holds and how a resume point is read, for `TorchAdapter`."""

    _writer: BackgroundWriter | None
    _snapshot: dict[str, IO[bytes]]
    _copy_now = False
    group: Any

    def write(self, store: ManifestStore, check: Check) -> Callable[[], None]:
        """The step's locations (one per variant of submodules), captured now: a host copy
        when the writer runs in the background, or when the job runs later (`snapshot`)."""
        assert isinstance(store, CheckpointStore)
        writes = [
            self._step_writer(store, check, models)
            for models in check.plan.variants
            if not store.has(store.step_file(check.step, models))
        ]

        def write_all() -> None:
            for write in writes:
                write()

        return write_all

    def snapshot(self, store: ManifestStore, check: Check) -> Callable[[], None]:
        self._copy_now = True
        try:
            return self.write(store, check)
        finally:
            self._copy_now = False

    def _step_writer(
        self, store: CheckpointStore, check: Check, models: tuple[str, ...] | None
    ) -> Callable[[], None]:
        relative = store.step_file(check.step, models)
        if isinstance(store, ShardedStore):  # every rank writes its shards (a collective)
            state, files = sharded_step(self, check, models, self.group.index)
            if self._copy_now:
                state = _copies(state)
            return lambda: store.write_sharded(relative, check.step, models, state, files)
        payload = self._payload(check, models)
        return lambda: store.write(relative, check.step, models, payload)

    def _payload(self, check: Check, models: tuple[str, ...] | None) -> dict[str, Any]:
        writer = self._writer
        copy = (
            (lambda x: host_copy(x, writer.host_copy)) if writer is not None
            else host_copy if self._copy_now else (lambda x: x)
        )
        return step_payload(self, check, models, copy)

    def read_resume(
        self, source: str, record: Mapping[str, Any], manifest: Mapping[str, Any]
    ) -> tuple[Any, Callable[[], None]]:
        """Read the resume point: a sharded step through DCP (on any number of ranks), a
        single file from a snapshot of it (the run in `source` may be being written;
        `record` and `manifest` follow the snapshot, see `open_resume_point`)."""
        if is_sharded(manifest["files"].get(record["file"], {})):
            return read_sharded_resume(self, source, record, manifest)
        self._snapshot = open_resume_point(source, record, manifest)  # type: ignore[arg-type]
        payload, callbacks_state = read_resume_point(source, record, manifest, self._snapshot)
        return callbacks_state, lambda: restore_payload(self, payload)

    def adopt(
        self, store: ManifestStore, source: str, record: Mapping[str, Any],
        manifest: Mapping[str, Any],
    ) -> dict[str, Any]:
        if isinstance(store, ShardedStore):
            return adopt_sharded(store, source, record, manifest)
        return adopt_files(store, source, record, manifest, self._snapshot)
