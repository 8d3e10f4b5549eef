"""B4: fcb's atomic checkpoint write of a ~200 MB state dict, against torch.save and the disk.

- fcb: `CheckpointStore.write`, the path every Torch checkpoint takes: `torch.save` into a
  temporary file through a writer that counts bytes and computes the CRC-32 the manifest
  records, flush, fsync, `os.replace`, fsync of the directory.
- torch: `torch.save(state, tmp)`, fsync, `os.replace` (atomic, no checksum).
- raw: the same number of bytes written sequentially from memory in 64 MiB blocks, fsync,
  `os.replace`: what the disk allows.

Each write starts with no dirty pages (`os.sync()` before it, not timed), and the three are
timed alternately. The bandwidth row compares bytes per second with the raw write.

Run: python benchmarks/b4_atomic_write.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, cli, interleaved, median, ms, ratios, spread, timed

from fcb.torch._store import CheckpointStore

BLOCK = 64 << 20


def state_dict(megabytes: int) -> dict[str, torch.Tensor]:
    """`megabytes` MiB of float32 tensors, 4 MiB each (a 50-layer model's weights)."""
    torch.manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(1024, 1024) for i in range(megabytes // 4)}


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writers:
    def __init__(self, state: dict[str, torch.Tensor], directory: str):
        self.state, self.directory = state, directory
        self.store = CheckpointStore(os.path.join(directory, "fcb"))
        self.store.open()
        self.step = 0
        self.fcb_write()  # the size of a checkpoint, for the raw write
        self.size = self.store.bytes_written
        self.block = bytearray(os.urandom(1 << 20)) * (BLOCK >> 20)

    def fcb_write(self) -> float:
        os.sync()
        self.step += 1
        relative = self.store.step_file(self.step, None)
        seconds = timed(lambda: self.store.write(relative, self.step, None, self.state))
        os.unlink(self.store.path(relative))  # never committed; the next step is a new file
        return seconds

    def torch_write(self) -> float:
        os.sync()
        final = os.path.join(self.directory, "torch.pt")
        tmp = final + ".tmp"

        def write() -> None:
            torch.save(self.state, tmp)
            fsync_path(tmp)
            os.replace(tmp, final)

        return timed(write)

    def raw_write(self) -> float:
        os.sync()
        final = os.path.join(self.directory, "raw.bin")
        tmp = final + ".tmp"
        view = memoryview(self.block)

        def write() -> None:
            with open(tmp, "wb", buffering=0) as f:
                left = self.size
                while left > 0:
                    left -= f.write(view[: min(left, BLOCK)])
                os.fsync(f.fileno())
            os.replace(tmp, final)

        return timed(write)

    def close(self) -> None:
        self.store.close()


def run(quick: bool = False) -> list[Row]:
    megabytes, repeats = (8, 2) if quick else (200, 15)
    with tempfile.TemporaryDirectory(prefix="fcb-b4-", dir=os.environ.get("FCB_BENCH_DIR")) as d:
        writers = Writers(state_dict(megabytes), d)
        try:
            times = interleaved(
                {
                    "fcb": writers.fcb_write,
                    "torch": writers.torch_write,
                    "raw": writers.raw_write,
                },
                repeats=repeats,
                warmup=1,
            )
        finally:
            writers.close()
    size = writers.size
    torch_ratios = ratios(times["fcb"], times["torch"])
    raw_ratios = ratios(times["raw"], times["fcb"])  # fcb MB/s over raw MB/s
    vs_torch, bandwidth = median(torch_ratios), median(raw_ratios)

    def rate(seconds: float) -> str:
        return f"{size / seconds / 1e6:.0f} MB/s"

    return [
        Row(
            id="B4",
            what=f"atomic checkpoint write of a {size / 1e6:.0f} MB state dict (CRC-32, fsync, "
            "rename) against torch.save + fsync + os.replace",
            fcb=ms(median(times["fcb"])),
            peer=ms(median(times["torch"])),
            ratio=vs_torch,
            target="<= 1.05x",
            met=vs_torch <= 1.05,
            note=f"{repeats} writes each, {spread(torch_ratios)}",
        ),
        Row(
            id="B4r",
            what="the same write's bandwidth against a raw sequential write + fsync",
            fcb=rate(median(times["fcb"])),
            peer=rate(median(times["raw"])),
            ratio=bandwidth,
            target=">= 0.75x",
            met=bandwidth >= 0.75,
            note=f"ratio: fcb bandwidth / raw bandwidth, {spread(raw_ratios)}",
        ),
    ]


if __name__ == "__main__":
    sys.exit(cli(run, __doc__))
