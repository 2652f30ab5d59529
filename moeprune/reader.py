"""Byte-exact partial reads of safetensors checkpoints.

mmap-based loaders let kernel readahead pull in most of a file even when only a few experts are wanted.
This reader parses the JSON headers only, then fetches exactly the byte ranges asked for with ``os.pread``
on file descriptors advised for random access. It counts reads and bytes (O(1) memory); with
``record=True`` it also logs every read, so tests can check exactly what was touched. The log is off by
default: a long-lived reader (a server swapping experts in on every pattern switch) would grow it forever.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoepruneError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first data byte in the file
    nbytes: int


def _open(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def _read_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``offset``; a read that stops early (end of file) means the file is truncated."""
    done = 0
    while done < len(view):  # Linux caps one read at ~2 GiB, so big tensors take several calls
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:
            chunk = os.pread(fd, len(view) - done, offset + done)
            got = len(chunk)
            view[done:done + got] = chunk
        if got == 0:
            raise MoepruneError(f"{path}: truncated file (wanted {len(view)} bytes at offset {offset}, "
                                f"got {done}); re-download it")
        done += got


def _parse_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str], int]:
    """Return the tensors, the __metadata__ and the header's size in bytes for one safetensors file."""
    size = path.stat().st_size
    if size < 8:
        raise MoepruneError(f"{path}: truncated file ({size} bytes, no header); re-download it")
    fd = _open(path)
    try:
        prefix = bytearray(8)
        _read_into(fd, memoryview(prefix), 0, path)
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES:
            raise MoepruneError(f"{path}: corrupt header (claims {n} bytes); re-download it")
        if 8 + n > size:
            raise MoepruneError(f"{path}: truncated file (header needs {8 + n} bytes, file has {size})")
        raw = bytearray(n)
        _read_into(fd, memoryview(raw), 8, path)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoepruneError(f"{path}: corrupt header (not JSON: {e}); re-download it") from None
    if not isinstance(header, dict):
        raise MoepruneError(f"{path}: corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES.get(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise MoepruneError(f"{path}: corrupt header entry for {name!r}: {info!r}") from None
        if dtype is None:
            raise MoepruneError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        want = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != want:
            raise MoepruneError(f"{path}: corrupt header: {name!r} has offsets [{begin}, {end}] "
                                f"but {info['dtype']} {list(shape)} needs {want} bytes")
        if 8 + n + end > size:
            raise MoepruneError(f"{path}: truncated file: {name!r} ends at byte {8 + n + end}, "
                                f"file has {size}; re-download it")
        entries[name] = _Entry(path, dtype, shape, 8 + n + begin, want)
    return entries, dict(meta), 8 + n


class CheckpointReader:
    """Read whole tensors, or chosen rows of them, from a (possibly sharded) safetensors checkpoint folder.

    Counters: `bytes_read`, `n_reads` (preads of tensor data), `header_bytes_read`. With `record=True`,
    `reads` also lists every read as (file name, offset, bytes); otherwise it stays empty.
    """

    def __init__(self, folder: str | os.PathLike, record: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MoepruneError(f"{self.folder}: checkpoint folder does not exist")
        self.bytes_read = 0
        self.n_reads = 0
        self.header_bytes_read = 0
        self.record = record
        self.reads: list[tuple[str, int, int]] = []
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reads may come from several threads (pread itself is positional)
        self._entries: dict[str, _Entry] = {}
        self._metadata: dict[str, str] = {}

        index = self.folder / INDEX_NAME
        wanted: dict[str, Path] | None = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                wanted = {name: self.folder / shard for name, shard in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise MoepruneError(f"{index}: corrupt index (needs a 'weight_map' object)") from None
            files = list(dict.fromkeys(wanted.values()))
            for f in files:
                if not f.is_file():
                    raise MoepruneError(f"{index}: missing shard {f.name} (named in the index)")
        elif (self.folder / SINGLE_NAME).is_file():
            files = [self.folder / SINGLE_NAME]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise MoepruneError(f"{self.folder}: no safetensors files (expected {INDEX_NAME} or {SINGLE_NAME})")

        per_file: dict[Path, dict[str, _Entry]] = {}
        for f in files:
            per_file[f], meta, header_bytes = _parse_header(f)
            self.header_bytes_read += header_bytes
            if f == files[0]:
                self._metadata = meta
        if wanted is not None:
            for name, f in wanted.items():
                if name not in per_file[f]:
                    raise MoepruneError(f"{f}: tensor {name!r} is in {INDEX_NAME} but not in this shard")
                self._entries[name] = per_file[f][name]
            return
        for f, entries in per_file.items():
            for name, entry in entries.items():
                if name in self._entries:
                    raise MoepruneError(f"{f}: tensor {name!r} is also in {self._entries[name].file.name}")
                self._entries[name] = entry

    # ---- header facts -------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.folder}") from None

    def keys(self) -> list[str]:
        """Tensor names, in index (or header) order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def file_of(self, name: str) -> Path:
        return self._entry(name).file

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first shard (empty if it has none)."""
        return dict(self._metadata)

    # ---- data ---------------------------------------------------------------------------------------
    def _pread(self, file: Path, view: memoryview, offset: int) -> None:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = _open(file)
            if self.record:
                self.reads.append((file.name, offset, len(view)))
            self.n_reads += 1
            self.bytes_read += len(view)
        _read_into(fd, view, offset, file)

    @staticmethod
    def _out_view(out: torch.Tensor, e: _Entry, nbytes: int, name: str) -> memoryview:
        if out.dtype != e.dtype or not out.is_contiguous() or out.device.type != "cpu":
            raise MoepruneError(f"cannot read {name!r} ({e.dtype}) into a {out.dtype} tensor on {out.device} "
                                "that is not contiguous CPU memory of the same dtype")
        if out.numel() * out.element_size() != nbytes:
            raise MoepruneError(f"cannot read {nbytes} bytes of {name!r} into a tensor of "
                                f"{out.numel() * out.element_size()} bytes")
        return memoryview(out.view(torch.uint8).numpy()).cast("B") if nbytes else memoryview(b"")

    @staticmethod
    def _to_tensor(buf: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor, read with one pread (into `out`, a contiguous CPU tensor, when given)."""
        e = self._entry(name)
        if out is not None:
            if e.nbytes:
                self._pread(e.file, self._out_view(out, e, e.nbytes, name), e.start)
            return out
        buf = bytearray(e.nbytes)
        if e.nbytes:
            self._pread(e.file, memoryview(buf), e.start)
        return self._to_tensor(buf, e.dtype, e.shape)

    def get_rows(self, name: str, rows: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` along dim 0, in the given order; each run of consecutive rows is one pread."""
        e = self._entry(name)
        if not e.shape:
            raise MoepruneError(f"{e.file}: tensor {name!r} is a scalar; it has no rows")
        rows = [int(r) for r in rows]
        for r in rows:
            if not 0 <= r < e.shape[0]:
                raise IndexError(f"row {r} out of range for {name!r} with shape {list(e.shape)}")
        row_bytes = math.prod(e.shape[1:]) * e.dtype.itemsize
        if out is not None:
            view = self._out_view(out, e, len(rows) * row_bytes, name)
            buf = None
        else:
            buf = bytearray(len(rows) * row_bytes)
            view = memoryview(buf)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            if row_bytes:
                self._pread(e.file, view[i * row_bytes:j * row_bytes], e.start + rows[i] * row_bytes)
            i = j
        if out is not None:
            return out
        return self._to_tensor(buf, e.dtype, (len(rows), *e.shape[1:]))

    # ---- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every open shard; a later read reopens what it needs."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
