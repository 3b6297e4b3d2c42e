"""A GGUF file's tensors, read one by one at their offsets and de-quantised on their own.

`GGUFFile` parses the header (metadata and the tensor table) from a read-only memory map and holds nothing
else: a tensor's bytes are paged in only when `tensor` or `rows` reads that tensor, so a node serving a few
layers touches those layers' bytes and the header, never the rest of the file. The `gguf` package's own
reader is not used for the header: it builds a numpy object per element of every metadata array, which for
a 262k-token vocabulary took 42 s to open here; walking the same header with struct takes well under one.

Values are de-quantised with the `gguf` package (every llama.cpp type it implements: Q8_0, Q6_K, Q4_K, Q5_0,
...) to fp32. The header is untrusted input: every count, length and offset is checked against the file.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4


class GGUFError(ValueError):
    """The file is not a GGUF file this reader can trust: bad magic, version, counts or offsets."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # rows first, as torch holds it (GGUF lists dimensions innermost first)
    qtype: GGMLQuantizationType
    offset: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        block, block_bytes = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * block_bytes


class _Cursor:
    """Reads little-endian values from the mapped header, refusing to run past the file's end."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer, self.pos = buffer, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise GGUFError("header runs past the end of the file")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > len(self.buffer):
            raise GGUFError("a string runs past the end of the file")
        text = bytes(self.buffer[self.pos: self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, kind: int) -> Any:
        """A metadata value; arrays are skipped (returned as None): only scalars are kept."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise GGUFError(f"unknown metadata value type {kind}")
        item_kind, count = self.take("<I"), self.take("<Q")
        if item_kind in _SCALARS:  # fixed size: jump over it
            size = struct.calcsize(_SCALARS[item_kind]) * count
            if self.pos + size > len(self.buffer):
                raise GGUFError("an array runs past the end of the file")
            self.pos += size
        else:
            for _ in range(count):
                self.value(item_kind)
        return None


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cursor = _Cursor(self._map)
        if bytes(self._map[:4]) != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file")
        cursor.pos = 4
        version = cursor.take("<I")
        if version not in (2, 3):
            raise GGUFError(f"{self.path} is GGUF version {version}; only versions 2 and 3 are read")
        tensor_count, kv_count = cursor.take("<Q"), cursor.take("<Q")
        if tensor_count > len(self._map) // 24 or kv_count > len(self._map) // 12:
            raise GGUFError(f"{self.path} claims {tensor_count} tensors and {kv_count} metadata keys")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.take("<I"))
        raw = [self._tensor_entry(cursor) for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"alignment {alignment} is not a power of two")
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors = {info.name: info for info in (self._locate(entry, data_start) for entry in raw)}

    def _tensor_entry(self, cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name, dims = cursor.string(), cursor.take("<I")
        if not 1 <= dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {dims} dimensions")
        shape = tuple(cursor.take("<Q") for _ in range(dims))[::-1]
        return name, shape, cursor.take("<I"), cursor.take("<Q")

    def _locate(self, entry: tuple[str, tuple[int, ...], int, int], data_start: int) -> TensorInfo:
        name, shape, kind, offset = entry
        try:
            qtype = GGMLQuantizationType(kind)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"tensor {name!r} has unknown type {kind}") from None
        if shape[-1] % block:
            raise GGUFError(f"tensor {name!r}: rows of {shape[-1]} are not whole {qtype.name} blocks of {block}")
        nbytes = math.prod(shape) // block * block_bytes
        begin = data_start + offset
        if begin + nbytes > len(self._map):
            raise GGUFError(f"tensor {name!r} at {begin}..{begin + nbytes} lies outside the file")
        return TensorInfo(name, shape, qtype, begin, nbytes)

    def _bytes(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as [rows, bytes per row]: a view of the map, nothing read yet."""
        flat = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return flat.reshape(-1, info.row_bytes)

    def tensor(self, name: str) -> np.ndarray:
        """The whole tensor, de-quantised to fp32, in its shape (rows first)."""
        info = self.tensors[name]
        return dequantize(self._bytes(info), info.qtype).reshape(info.shape).astype(np.float32, copy=False)

    def rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` of a 2-D tensor, de-quantised to fp32: reads only those rows' bytes."""
        info = self.tensors[name]
        return dequantize(self._bytes(info)[indices], info.qtype).astype(np.float32, copy=False)
