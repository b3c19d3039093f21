"""Merged models: a GGUF base with LoRA adapters folded into its weights (llama-export-lora's job).

    W' = W + Σ_k s_k · (alpha_k / r_k) · B_k·A_k     for every tensor an adapter touches: the update
                                                     llama.cpp applies at --lora-scaled ADAPTER:s_k
                                                     (read_gguf_adapter sets it, LoraWeights.delta
                                                     computes it)
Everything else of the base is kept: every metadata key with its value and GGUF type (tokenizer, chat
template, ...), every other tensor byte for byte in its type, in the base's order. Changed keys:
general.file_type (for the merged tensors' type), general.base_model.* (the base, then each adapter:
the merge's parents; the base's own parents stay in the base's file) and ggtrain.* (what was merged).

Type of the merged tensors (outtype):
    f16 (default)  F16, but F32 where the base tensor is F32: what llama-export-lora writes
    bf16           BF16, F32 kept F32 likewise
    f32            F32
    q8_0, q4_0     Q8_0 / Q4_0 (F16 for a tensor whose rows are not a multiple of 32; a tensor already
                   in that type is merged as with same)
    same           the base tensor's own type: a merged Q4_K_M stays the size of a Q4_K_M. Each block
                   is llama.cpp's reference quantization of W + ΔW (ggtrain.kernels.quantize, what
                   llama-quantize writes), or the base's own block where that is at least as close to
                   W + ΔW (keep_closer: re-quantizing alone adds a second rounding error)
general.file_type: ALL_F32, MOSTLY_F16, MOSTLY_BF16, MOSTLY_Q8_0 or MOSTLY_Q4_0 (llama-export-lora sets
MOSTLY_F16 likewise); `same` keeps the base's.

Adapters are refused as everywhere else (read_gguf_adapter): another architecture or shapes, a LoRA on
token_embd, an output-head LoRA for a model whose head is tied to the token embeddings (llama.cpp
cannot apply that one either: the model has no output.weight). A fitting adapter trained on another
base file gets a note.

Memory: tensors are read with pread, not through the mmap (every page touched there would stay in the
process's RSS until the end), and a merged tensor is done in blocks of rows (dequantize, add the update,
quantize, write), so memory stays near one block: below one tensor's f32 size. The file is written
beside its final name, fsynced and renamed (ggtrain.atomic).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QT

from ggtrain import __version__
from ggtrain.adapters.gguf_lora import KEY_VERSION, add_lineage, lineage, read_gguf_adapter
from ggtrain.atomic import atomic_path, check_free_space
from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import SUPPORTED_TYPES, ModelFile, type_name
from ggtrain.kernels.quantize import row_bytes
from ggtrain.model.lora import LoraWeights
from ggtrain.rss import MemoryMonitor

OUTTYPES = ("f16", "bf16", "f32", "q8_0", "q4_0", "same")
_OUT_QT = {"f16": QT.F16, "bf16": QT.BF16, "f32": QT.F32, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
_FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)  # rounded value by value: re-rounding is already the closest
KEY_ADAPTERS = "ggtrain.adapters.merge.adapters"  # [string] the adapters' file names, in merge order
KEY_SCALES = "ggtrain.adapters.merge.scales"  # [f32] their scales
KEY_OUTTYPE = "ggtrain.adapters.merge.outtype"  # the --outtype
_COPY_CHUNK = 16 << 20  # bytes per read/write when copying an untouched tensor
_BLOCK_BYTES = 8 << 20  # float64 update of one block of rows of a merged tensor


@dataclass
class MergeResult:
    path: Path
    merged: Counter = field(default_factory=Counter)  # output type name -> merged tensors
    copied: int = 0  # tensors copied as they are
    size: int = 0  # bytes of the output file
    seconds: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    largest_f32: int = 0  # bytes of the largest merged tensor at f32
    notes: list[str] = field(default_factory=list)


def out_type(base_type: int, cols: int, outtype: str) -> QT:
    """The type a merged tensor is written in (see the module docstring)."""
    qt = QT(base_type)
    if outtype == "same":
        return qt
    if outtype in ("f16", "bf16") and qt == QT.F32:
        return QT.F32
    want = _OUT_QT[outtype]
    if want in (QT.Q8_0, QT.Q4_0) and cols % 32:
        return QT.F16
    return want


class _Writer(gguf.GGUFWriter):
    """gguf-py's writer, except that an empty array is written (GGUF allows it; gguf-py refuses it),
    so a base's empty metadata array is copied too."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _copy_metadata(w: gguf.GGUFWriter, mf: ModelFile, file_type: int) -> None:
    """Every key of the base with its GGUF type, but the ones the merge rewrites."""
    VT = gguf.GGUFValueType
    for key, value in mf.metadata.items():
        if key == "general.architecture" or key.startswith(("general.base_model.", "ggtrain.")):
            continue  # the writer's own / the merge's parents / what this merge was
        if key == "general.file_type":
            w.add_uint32(key, file_type)
            continue
        vtype, etype = mf.value_types[key]
        if etype == VT.ARRAY:
            raise GGTrainError(f"{mf.path}: metadata '{key}' is an array of arrays, which ggtrain cannot "
                               "copy")
        if isinstance(value, np.ndarray):
            value = value.tolist()
        w.add_key_value(key, value, VT(vtype), sub_type=VT(etype) if etype is not None else None)
    if "general.file_type" not in mf.metadata:
        w.add_uint32("general.file_type", file_type)


def _pread(fd: int, n: int, offset: int) -> bytearray:
    """n bytes of the file at offset (os.pread may return fewer at a time)."""
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), offset + len(out))
        if not chunk:
            raise GGTrainError(f"unexpected end of file at offset {offset + len(out)} (the base changed "
                               "while merging?)")
        out += chunk
    return out


def _copy_chunks(fd: int, t: Any) -> Iterator[bytearray]:
    for start in range(0, t.nbytes, _COPY_CHUNK):
        yield _pread(fd, min(_COPY_CHUNK, t.nbytes - start), t.offset + start)


def _merged_rows(fd: int, t: Any, loras: Sequence[LoraWeights], qt: QT) -> Iterator[np.ndarray]:
    """The merged tensor in qt, one block of rows at a time (uint8, flat). In the base's own block
    type, each block is the closer to W + ΔW of the re-quantized block and the base's (keep_closer)."""
    from ggtrain import kernels
    from ggtrain.kernels.quantize import quantize

    rows, cols = t.shape
    rb = t.data.shape[1]  # bytes of a base row
    step = max(1, _BLOCK_BYTES // (8 * cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = np.frombuffer(_pread(fd, (r1 - r0) * rb, t.offset + r0 * rb), dtype=np.uint8)
        raw = raw.reshape(r1 - r0, rb)
        w = kernels.dequantize(raw, t.qtype)
        target = w.astype(np.float64)
        for lw in loras:
            if t.name in lw:
                target += lw.delta(t.name, slice(r0, r1))
        target = target.astype(np.float32)
        q = quantize(target, qt)
        if qt == t.qtype and qt not in _FLOAT_TYPES:
            q = keep_closer(q, raw, w, target, qt)
        yield q.reshape(-1)


def keep_closer(q: np.ndarray, base_q: np.ndarray, base_w: np.ndarray, target: np.ndarray,
                qtype: int) -> np.ndarray:
    """Per quantization block: the re-quantized block q, or the base's own block base_q where that is
    at least as close to the target (sum of squared errors); base_w is base_q dequantized.

    Why: a LoRA update is mostly far below the grid's step. Re-quantizing W + ΔW makes the search pick
    new scales for the whole block, which adds a second rounding error over all of its values, while
    ΔW itself mostly rounds away; where the base's block is the closer one, keeping it loses less.
    Measured on Gemma 3 270M Q4_K_M with a random r8 adapter on every projection (llama-perplexity,
    4 chunks of 128): base + adapter 15.32; re-quantized blocks only 15.80 (+3.1%); with this choice
    15.46 (+0.9%), 39% of the blocks kept."""
    from ggtrain import kernels

    block, size = GGML_QUANT_SIZES[QT(qtype)]
    rows = q.shape[0]
    err_q = _block_sq_err(kernels.dequantize(q, qtype), target, block)
    err_base = _block_sq_err(base_w, target, block)
    keep = err_base <= err_q  # (rows, blocks per row)
    if not keep.any():
        return q
    out = q.reshape(rows, -1, size).copy()
    out[keep] = base_q.reshape(rows, -1, size)[keep]
    return out.reshape(rows, -1)


def _block_sq_err(w: np.ndarray, target: np.ndarray, block: int) -> np.ndarray:
    d = (w - target).astype(np.float64)
    return np.einsum("rbk,rbk->rb", d.reshape(d.shape[0], -1, block), d.reshape(d.shape[0], -1, block))


def merge(base_path: str | os.PathLike, adapters: Sequence[tuple[str | os.PathLike, float]],
          out: str | os.PathLike, outtype: str = "f16", progress: bool = True,
          echo: Callable[[str], None] = print) -> MergeResult:
    """Write base + Σ scale·adapter to `out` (see the module docstring); return what was done.
    echo: where notes go (e.g. an adapter trained on another quantization of the base)."""
    if outtype not in OUTTYPES:
        raise GGTrainError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    if not adapters:
        raise GGTrainError("merge needs at least one --lora ADAPTER")
    t0 = time.perf_counter()
    out = Path(out)
    res = MergeResult(out)

    def note(msg: str) -> None:
        res.notes.append(msg)
        echo(msg)

    mf = ModelFile(base_path, check_types=False)
    try:
        if int(mf.get("split.count", 1) or 1) > 1:
            raise GGTrainError(f"{mf.path}: a split model (one shard of {mf.get('split.count')}): join the "
                               "shards first with llama-gguf-split --merge")
        _check_output(out, [mf.path, *(Path(a) for a, _ in adapters)])
        loras, parents = [], [lineage(mf.metadata, mf.path)]
        for path, scale in adapters:
            lw, _, meta = read_gguf_adapter(path, base=mf, scale=scale, warn=note)
            loras.append(lw)
            parents.append(lineage(meta, Path(path)))
        plan = _plan(mf, loras, outtype, res)
        sizes = {n: _out_bytes(mf.tensors[n], qt) for n, qt in plan.items()}
        file_type = int(mf.get("general.file_type", 0)) if outtype == "same" else int(_FILE_TYPE[outtype])
        check_free_space(out.parent, sum(sizes.values()) + mf.data_offset,
                         f"the merged model {out.name}")

        _warm_up(mf, plan)  # the kernels' first calls load compiled code: not the merge's memory
        monitor = MemoryMonitor().start()
        res.rss_start = monitor.rss
        fd = os.open(mf.path, os.O_RDONLY)
        try:
            with atomic_path(out) as tmp:
                w = _Writer(tmp, mf.architecture)
                try:
                    w.data_alignment = mf.alignment
                    _copy_metadata(w, mf, file_type)
                    add_lineage(w, parents)
                    w.add_string(KEY_VERSION, __version__)
                    w.add_array(KEY_ADAPTERS, [Path(a).name for a, _ in adapters])
                    w.add_key_value(KEY_SCALES, [float(s) for _, s in adapters], gguf.GGUFValueType.ARRAY,
                                    sub_type=gguf.GGUFValueType.FLOAT32)
                    w.add_string(KEY_OUTTYPE, outtype)
                    _write_tensors(w, mf, fd, plan, sizes, loras, res, progress)
                finally:
                    w.close()
        finally:
            os.close(fd)
            monitor.stop()
        res.rss_peak = monitor.peak
    finally:
        mf.close()
    res.size = out.stat().st_size
    res.seconds = time.perf_counter() - t0
    return res


def _plan(mf: ModelFile, loras: Sequence[LoraWeights], outtype: str,
          res: MergeResult) -> dict[str, QT | None]:
    """Tensor name -> the type it is merged into, None for one copied as it is; base order."""
    adapted = {n for lw in loras for n in lw.names}
    plan: dict[str, QT | None] = {}
    for name, t in mf.tensors.items():
        if name not in adapted:
            plan[name] = None
            continue
        if t.qtype not in SUPPORTED_TYPES:
            raise GGTrainError(f"{mf.path}: tensor '{name}' has type {t.type_name}, which ggtrain cannot "
                               "dequantize to merge an adapter into")
        plan[name] = out_type(t.qtype, t.cols, outtype)
        res.largest_f32 = max(res.largest_f32, 4 * t.n_elements)
    return plan


def _out_bytes(t: Any, qt: QT | None) -> int:
    """Bytes of tensor t in the output: as it is (qt None), or its rows in type qt."""
    return t.nbytes if qt is None else t.rows * row_bytes(t.cols, qt)


def _warm_up(mf: ModelFile, plan: dict[str, QT | None]) -> None:
    """Call dequantize and quantize once per type the merge uses, on one row."""
    from ggtrain import kernels
    from ggtrain.kernels.quantize import quantize

    seen = set()
    for name, qt in plan.items():
        t = mf.tensors[name]
        if qt is not None and (t.qtype, qt) not in seen:
            seen.add((t.qtype, qt))
            quantize(kernels.dequantize(np.zeros((1, t.data.shape[1]), np.uint8), t.qtype), qt)


def _write_tensors(w: gguf.GGUFWriter, mf: ModelFile, fd: int, plan: dict[str, QT | None],
                   sizes: dict[str, int], loras: Sequence[LoraWeights], res: MergeResult,
                   progress: bool) -> None:
    """Header, metadata, tensor table, then each tensor's data as it is copied or merged."""
    from tqdm import tqdm

    for name, qt in plan.items():
        t = mf.tensors[name]
        w.add_tensor_info(name, t.shape, np.dtype(np.float32), sizes[name],
                          raw_dtype=QT(t.qtype) if qt is None else qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    f = w.fout[0]
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="merging", leave=False,
              disable=None if progress else True) as bar:
        for name, qt in plan.items():
            t = mf.tensors[name]
            w.write_padding(f, f.tell())
            written = 0
            for chunk in _copy_chunks(fd, t) if qt is None else _merged_rows(fd, t, loras, qt):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
            if written != sizes[name]:  # the tensor table already promised sizes[name]
                raise AssertionError(f"{name}: wrote {written} bytes, the tensor table says {sizes[name]}")
            w.write_padding(f, written)
            if qt is None:
                res.copied += 1
            else:
                res.merged[type_name(qt)] += 1
    f.flush()


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is a directory or one of the inputs (the rename would replace it)."""
    if out.is_dir():
        raise GGTrainError(f"{out}: is a directory; give the merged model's file name (-o OUT.gguf)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise GGTrainError(f"{out}: there is no directory {parent} to write it in")
    if out.exists():
        for p in inputs:
            if p.exists() and os.path.samefile(out, p):
                raise GGTrainError(f"{out}: is one of the inputs ({p}); write the merged model to another "
                                   "file")
