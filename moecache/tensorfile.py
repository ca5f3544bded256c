"""Read tensors from a safetensors file with ``pread``, one tensor (or one expert slice) at a time.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page read through the map
stays in the process's resident set (``RssFile``) until the map is closed. Loading a checkpoint of
N GB that way peaks at the host store (N GB) *plus* the mapped file (N GB). Reading with ``pread``
into a fresh buffer keeps only the tensor being converted; the page cache that the kernel keeps
is not ours and is dropped with ``posix_fadvise`` once a file is done.

Format (safetensors): 8-byte little-endian header length, a JSON header mapping each name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the end of the header, then data.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch

from .errors import ConfigError

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
#: A header larger than this is not a safetensors header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 2**20


class TensorFile:
    """One safetensors file, read by offset. ``keys()``, ``get_tensor(key)``, ``get_row(key, i)``."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            head = os.pread(self._fd, 8, 0)
            if len(head) != 8:
                raise ConfigError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise ConfigError(f"{path}: not a safetensors file (header length {n} bytes)")
            header: dict[str, Any] = json.loads(os.pread(self._fd, n, 8))
        except (ValueError, UnicodeDecodeError) as e:
            self._drop()
            raise ConfigError(f"{path}: unreadable safetensors header ({e}); re-save the checkpoint") from e
        except BaseException:
            self._drop()
            raise
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, key: str) -> tuple[torch.dtype, list[int], int, int]:
        meta = self._entries[key]
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ConfigError(f"{self.path}: tensor {key} has dtype {meta['dtype']}, which moecache cannot read")
        begin, end = meta["data_offsets"]
        return dtype, list(meta["shape"]), self._start + begin, self._start + end

    def _read(self, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:  # pread may return less than asked (large reads, signals)
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise ConfigError(f"{self.path}: file ends early (truncated checkpoint?)")
            done += got
        return buf.view(dtype).reshape(shape)

    def get_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entry(key)
        return self._read(begin, end - begin, dtype, shape)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a tensor stored row-major, read without the other rows."""
        dtype, shape, begin, end = self._entry(key)
        if not shape or not 0 <= index < shape[0]:
            raise IndexError(f"{key}: row {index} of shape {shape}")
        row = (end - begin) // shape[0]
        return self._read(begin + index * row, row, dtype, shape[1:])

    def close(self) -> None:
        if self._fd >= 0:
            try:  # the page cache of a file read once is of no further use to anyone
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _drop(self) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self._drop()
