"""GGUF model file: mmap, validation, metadata and zero-copy quantized tensor views.

Layout (GGUF v2/v3, little-endian):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv × (string key, u32 value_type, value)
    n_tensors × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32) | tensor data (each offset aligned)
Strings are u64 length + UTF-8 bytes. Nothing is dequantized here: a tensor is a uint8 view of
its rows straight into the mapping.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ggtrain.errors import GGTrainError
from ggtrain.kernels import SUPPORTED_TYPES  # the types the kernels compute with

if TYPE_CHECKING:
    from typing_extensions import Self

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (name, struct format or None for variable-size).
_VT_UINT8, _VT_INT8, _VT_UINT16, _VT_INT16, _VT_UINT32, _VT_INT32 = 0, 1, 2, 3, 4, 5
_VT_FLOAT32, _VT_BOOL, _VT_STRING, _VT_ARRAY, _VT_UINT64, _VT_INT64, _VT_FLOAT64 = 6, 7, 8, 9, 10, 11, 12
_SCALAR_FMT = {
    _VT_UINT8: "<B", _VT_INT8: "<b", _VT_UINT16: "<H", _VT_INT16: "<h", _VT_UINT32: "<I",
    _VT_INT32: "<i", _VT_FLOAT32: "<f", _VT_BOOL: "<?", _VT_UINT64: "<Q", _VT_INT64: "<q",
    _VT_FLOAT64: "<d",
}
_NUMPY_DTYPE = {
    _VT_UINT8: np.uint8, _VT_INT8: np.int8, _VT_UINT16: np.uint16, _VT_INT16: np.int16,
    _VT_UINT32: np.uint32, _VT_INT32: np.int32, _VT_FLOAT32: np.float32, _VT_BOOL: np.bool_,
    _VT_UINT64: np.uint64, _VT_INT64: np.int64, _VT_FLOAT64: np.float64,
}


def type_name(qtype: int) -> str:
    """'Q4_K' for 12; 'type 99' for a type gguf does not know."""
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file, as stored.

    shape is numpy order (rows..., cols): ggml's ne reversed, so a weight `W` used as
    `y = x @ W.T` has shape (out, in). data is a uint8 view (nrows, row_bytes) into the mapping.
    """

    name: str
    qtype: int
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    nbytes: int
    data: np.ndarray  # uint8 (nrows, row_bytes), zero-copy

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Reads GGUF header fields from a buffer, turning every overrun into a GGTrainError."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> GGTrainError:
        return GGTrainError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt GGUF: {what} runs past the end of the file "
                            f"(offset {self.pos}, file size {self.size})")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        raw = bytes(self.buf[start:start + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR_FMT:
            return self.scalar(_SCALAR_FMT[vtype], what)
        if vtype == _VT_STRING:
            return self.string(what)
        if vtype == _VT_ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _NUMPY_DTYPE:  # numeric arrays in one read
                dt = np.dtype(_NUMPY_DTYPE[etype]).newbyteorder("<")
                start = self.take(count * dt.itemsize, what)
                return np.frombuffer(self.buf, dtype=dt, count=count, offset=start).copy()
            if etype == _VT_STRING:
                return [self.string(what) for _ in range(count)]
            if etype == _VT_ARRAY:
                return [self.value(_VT_ARRAY, what) for _ in range(count)]
            raise self.fail(f"corrupt GGUF: {what} has unknown array element type {etype}")
        raise self.fail(f"corrupt GGUF: {what} has unknown value type {vtype}")


class ModelFile:
    """A GGUF file opened by mmap: metadata dict, tensors by name, hparams via ggtrain.gguf.arch.

    Raises GGTrainError (naming the file) for anything that is not a well-formed GGUF.
    """

    def __init__(self, path: str | os.PathLike, check_types: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise GGTrainError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise GGTrainError(f"{self.path}: is a directory, not a GGUF file")
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size < 24:
                    head = f.read(4)
                    if head != GGUF_MAGIC:
                        raise GGTrainError(f"{self.path}: not a GGUF file (no 'GGUF' magic)")
                    raise GGTrainError(f"{self.path}: truncated GGUF ({self.file_size} bytes, header is 24)")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGTrainError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self.metadata: dict[str, Any] = {}
        # key -> (GGUF value type, element type for arrays else None): what a copy of the metadata
        # must write back (an int is u32 in one key and i32 in another; llama.cpp checks the type)
        self.value_types: dict[str, tuple[int, int | None]] = {}
        self.tensors: dict[str, Tensor] = {}
        self._fingerprint: str | None = None
        self._parse()
        if check_types:
            self.check_tensor_types()

    # -- parsing -------------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._mmap, self.path)
        magic = bytes(self._mmap[:4])
        if magic != GGUF_MAGIC:
            if magic[::-1] == GGUF_MAGIC:
                raise cur.fail("big-endian GGUF is not supported")
            raise cur.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            if self.version & 0xFFFF == 0 and self.version >> 24 in (2, 3):  # byte-swapped 2 or 3
                raise cur.fail("big-endian GGUF is not supported")
            raise cur.fail(f"unsupported GGUF version {self.version} (2 and 3 are supported)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        # Each kv / tensor info takes at least 12 bytes: a count beyond that is corruption.
        if n_tensors > self.file_size // 12 or n_kv > self.file_size // 12:
            raise cur.fail(f"truncated or corrupt GGUF header: {n_tensors} tensors / {n_kv} metadata entries "
                           f"cannot fit in {self.file_size} bytes")
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar("<I", f"type of metadata '{key}'")
            etype = None
            if vtype == _VT_ARRAY and cur.pos + 4 <= self.file_size:
                etype = struct.unpack_from("<I", self._mmap, cur.pos)[0]
            self.metadata[key] = cur.value(vtype, f"metadata '{key}'")
            self.value_types[key] = (vtype, etype)

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"invalid general.alignment {alignment!r} (must be a power of two)")
        self.alignment = alignment

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("<I", f"dimension count of tensor '{name}'")
            if n_dims > 4:
                raise cur.fail(f"corrupt GGUF: tensor '{name}' has {n_dims} dimensions (at most 4)")
            ne = [cur.scalar("<Q", f"shape of tensor '{name}'") for _ in range(n_dims)]
            qtype = cur.scalar("<I", f"type of tensor '{name}'")
            offset = cur.scalar("<Q", f"offset of tensor '{name}'")
            infos.append((name, ne, qtype, offset))

        data_start = -(-cur.pos // alignment) * alignment
        self.data_offset = data_start
        for name, ne, qtype, offset in infos:
            if qtype not in GGML_QUANT_SIZES:
                raise cur.fail(f"tensor '{name}' has unknown tensor type {qtype}")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            if any(d == 0 for d in ne) or not ne:
                raise cur.fail(f"corrupt GGUF: tensor '{name}' has an empty shape {ne}")
            if ne[0] % block:
                raise cur.fail(f"corrupt GGUF: tensor '{name}' row of {ne[0]} is not a multiple of "
                               f"the {type_name(qtype)} block size {block}")
            if offset % alignment:
                raise cur.fail(f"corrupt GGUF: tensor '{name}' offset {offset} is not aligned to {alignment}")
            row_bytes = ne[0] // block * type_size
            nrows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
            nbytes = row_bytes * nrows
            start = data_start + offset
            if start + nbytes > self.file_size:
                raise cur.fail(f"truncated GGUF: tensor '{name}' ({nbytes} bytes at offset {start}) "
                               f"runs past the end of the file ({self.file_size} bytes)")
            data = np.frombuffer(self._mmap, dtype=np.uint8, count=nbytes, offset=start)
            self.tensors[name] = Tensor(name, qtype, tuple(reversed(ne)), start, nbytes,
                                        data.reshape(nrows, row_bytes))

    # -- validation ----------------------------------------------------------------------------
    def check_tensor_types(self) -> None:
        """Refuse tensor types the kernels cannot compute with, naming the file and the tensors."""
        bad: dict[str, list[str]] = {}
        for t in self.tensors.values():
            if t.qtype not in SUPPORTED_TYPES:
                bad.setdefault(t.type_name, []).append(t.name)
        if bad:
            parts = [f"{k} ({len(v)} tensors, e.g. {v[0]})" for k, v in sorted(bad.items())]
            supported = ", ".join(type_name(t) for t in sorted(SUPPORTED_TYPES))
            raise GGTrainError(f"{self.path}: unsupported tensor type {'; '.join(parts)}; "
                               f"supported: {supported}")

    # -- access --------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGTrainError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def fingerprint(self) -> str:
        """model_fingerprint(self), computed once per opened file."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self)
        return self._fingerprint

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGTrainError(f"{self.path}: tensor '{name}' is missing") from None

    def close(self) -> None:
        self.tensors.clear()
        try:
            self._mmap.close()
        except BufferError:
            pass  # views still alive elsewhere; the mapping goes with them

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SAMPLE = 4096  # bytes hashed at the start, middle and end of every tensor for the fingerprint


def model_fingerprint(mf: ModelFile) -> str:
    """sha256 (hex) identifying a base model: architecture, every tensor's name/type/shape, and
    samples of every tensor's bytes (start, middle, end) — cheap on a multi-GB mmap, yet different
    for another model, another quantization or another fine-tune of the same architecture.
    Checkpoints and adapters record it, so a resume or an adapter on another base is caught."""
    h = hashlib.sha256()
    h.update(str(mf.metadata.get("general.architecture")).encode())
    for name in sorted(mf.tensors):
        t = mf.tensors[name]
        h.update(f"|{name}:{t.qtype}:{t.shape}".encode())
        flat = t.data.reshape(-1)
        n = flat.size
        for start in (0, max(0, n // 2 - _SAMPLE // 2), max(0, n - _SAMPLE)):
            h.update(flat[start:start + _SAMPLE].tobytes())
    return h.hexdigest()
