"""Checkpoint checksums are zlib's CRC-32, whichever implementation computes them."""

from __future__ import annotations

import os
import zlib

from fcb import _files


def test_the_checksum_is_zlib_crc32_for_chained_blocks_of_any_size(tmp_path):
    data = os.urandom(3 << 20)
    blocks = [data[:7], data[7 : 1 << 20], data[1 << 20 :]]
    path = tmp_path / "file.bin"
    record = _files.atomic_write(str(path), lambda f: [f.write(b) for b in blocks])
    assert record == {"size": len(data), "crc32": zlib.crc32(data)}
    assert _files.file_checksum(str(path), chunk=1 << 16) == record
    _files.verify(str(path), record)
