"""Safetensors without torch: parse the header, read one tensor at a time with positioned reads.

Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes. Positioned reads (not a memory map) keep resident memory to the
tensor being read, which is what lets a 93 GB checkpoint convert in about one layer of RAM.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from .errors import CheckpointError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_HEADER_LIMIT = 100 * 2**20


class SafetensorsFile:
    """One .safetensors file, validated on open; tensors are read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_HEADER_LIMIT, size - 8):
                    raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or begin < 0:
                raise CheckpointError(f"{path}: {name!r} byte range does not match its shape and dtype")
            if self._data_start + end > size:
                raise CheckpointError(f"{path}: truncated file ({name!r} lies past the end, "
                                      f"{size} bytes on disk)")
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh numpy array (no mapping is kept)."""
        dtype, shape, begin, end = self._entries[name]
        buf = np.empty(end - begin, np.uint8)
        view = memoryview(buf)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(buf):
                got = os.preadv(fd, [view[done:]], self._data_start + begin + done)
                if got == 0:
                    raise CheckpointError(f"{self.path}: truncated file while reading {name!r}")
                done += got
        finally:
            os.close(fd)
        return buf.view(dtype).reshape(shape)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header first (from the declared layout),
    then each tensor in the declared order, so a file larger than memory can be written."""

    def __init__(self, path: str, layout: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        names = {v: k for k, v in DTYPES.items()}
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._pending = []
        for name, dtype, shape in layout:
            dtype = np.dtype(dtype)
            if dtype not in names:
                raise CheckpointError(f"{path}: cannot store dtype {dtype} of {name!r}")
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": names[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._pending.append((name, dtype, tuple(shape)))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
        self.path = path
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, a: np.ndarray) -> None:
        expected = self._pending.pop(0)
        if (name, a.dtype, a.shape) != expected:
            raise AssertionError(f"{self.path}: wrote {name} {a.dtype} {a.shape}, expected {expected}")
        self._f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # bf16 has no buffer format

    def close(self) -> None:
        self._f.close()
        if self._pending:
            raise AssertionError(f"{self.path}: {len(self._pending)} tensors were never written")


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write a dict of numpy arrays as one safetensors file."""
    writer = SafetensorsWriter(path, [(k, a.dtype, a.shape) for k, a in tensors.items()], metadata)
    for k, a in tensors.items():
        writer.write(k, a)
    writer.close()
