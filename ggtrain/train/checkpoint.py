"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one uncompressed .npz (a zip: every member CRC-checked on reading) written with
atomic_write, holding
    lora            f32 (n,)   LoraWeights.flat
    opt.m.NAME      f32        AdamW first moments,  one per optimizer parameter NAME
    opt.v.NAME      f32        AdamW second moments
    meta            uint8      UTF-8 JSON: format/version, LoRA layout, optimizer scalars, step, epoch,
                               data position, RNG states, config, base-model fingerprint, and a
                               sha256 of every array (a corrupt member is named, not just "bad zip")
No pickles: np.load(allow_pickle=False) reads it, so a checkpoint cannot run code.
The base-model fingerprint makes a checkpoint for another base (or another quantization of it) a
clear refusal instead of a silently wrong resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggtrain.atomic import atomic_write
from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile, model_fingerprint  # noqa: F401  (also imported from here)
from ggtrain.model.lora import LoraWeights

FORMAT = "ggtrain-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """The state of a run between two optimizer steps."""

    lora: LoraWeights
    optimizer: dict[str, Any]  # AdamW.state_dict()
    step: int  # optimizer steps done
    epoch: int
    data_position: dict[str, Any] = field(default_factory=dict)  # opaque to us: the data loader's state
    config: dict[str, Any] = field(default_factory=dict)  # the run's settings (JSON-able)
    base_fingerprint: str = ""
    base_name: str = ""  # file name of the base model, for messages
    extra: dict[str, Any] = field(default_factory=dict)  # anything else JSON-able (loss history, ...)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


def save_checkpoint(path: str | os.PathLike, ck: Checkpoint) -> Path:
    """Write ck to path atomically (temp file, fsync, rename): a failure leaves the previous one."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"lora": ck.lora.flat}
    opt = dict(ck.optimizer)
    for key in ("m", "v"):
        for name, a in opt.pop(key, {}).items():
            arrays[f"opt.{key}.{name}"] = a
    meta = {
        "format": FORMAT, "version": VERSION,
        "lora_layout": ck.lora.layout_dict(), "optimizer": opt, "step": int(ck.step), "epoch": int(ck.epoch),
        "data_position": ck.data_position, "config": ck.config,
        "base_fingerprint": ck.base_fingerprint, "base_name": ck.base_name, "extra": ck.extra,
        "sha256": {k: _sha(a) for k, a in arrays.items()},
    }
    try:
        blob = json.dumps(meta, sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint state is not JSON-serialisable: {e}") from None
    arrays["meta"] = np.frombuffer(blob, dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


_WHAT_IT_TAKES = "a checkpoint is the checkpoint-*.npz that ggtrain finetune writes into its --outdir"


def _looks_like(head: bytes) -> str:
    """What a file that is no zip archive seems to be, from its first bytes, for the refusal."""
    if not head:
        return "an empty file"
    if head.startswith(b"GGUF"):
        return "a GGUF file (a model or an adapter)"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array"
    if head[:1] == b"\x80":
        return "a Python pickle, which ggtrain never loads"
    if b"\x00" in head:
        return "binary data"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not merely a character cut at the end of the sample
            return "binary data"
    return "a text file"


def _holds_objects(z: Any, name: str) -> bool:
    """Whether npz member `name` is an object (pickled) array, read from its .npy header alone."""
    fmt = np.lib.format
    try:
        with z.zip.open(f"{name}.npy") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            return bool(read(f)[2].hasobject)
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile):  # reported as corruption by the caller
        return False


def _read_arrays(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a checkpoint file; anything else is a GGTrainError saying what the file is."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise GGTrainError(f"{path}: cannot read: {e.strerror or e}") from None
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip archive (npz) or nothing of ours
        raise GGTrainError(f"{path}: not a ggtrain checkpoint: it is {_looks_like(head)}; {_WHAT_IT_TAKES}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise GGTrainError(f"{path}: not a ggtrain checkpoint (a zip archive without ggtrain's 'meta' "
                                   f"member; {_WHAT_IT_TAKES})")
            arrays: dict[str, np.ndarray] = {}
            for k in z.files:
                try:
                    a = z[k]
                except ValueError:
                    if _holds_objects(z, k):
                        raise GGTrainError(f"{path}: not a ggtrain checkpoint: member '{k}' holds pickled Python "
                                           "objects, which ggtrain never loads (its checkpoints hold only "
                                           "numeric arrays)") from None
                    raise
                if not isinstance(a, np.ndarray):
                    raise GGTrainError(f"{path}: not a ggtrain checkpoint (member '{k}' is not a numpy array)")
                arrays[k] = a
    except GGTrainError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise GGTrainError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GGTrainError(f"{path}: corrupt checkpoint (unreadable metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GGTrainError(f"{path}: not a ggtrain checkpoint ({_WHAT_IT_TAKES})")
    return meta, arrays


def load_checkpoint(path: str | os.PathLike, base: ModelFile | None = None,
                    fingerprint: str | None = None) -> Checkpoint:
    """Read and validate a checkpoint. With `base` (or its `fingerprint`), one written for another
    base model is refused. Truncated, corrupt or foreign files (text, a GGUF, another zip, an npz
    with pickles) give a GGTrainError naming the file and what it is; nothing is ever unpickled."""
    path = Path(path)
    if not path.exists():
        raise GGTrainError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise GGTrainError(f"{path}: is a directory, not a checkpoint file")
    meta, arrays = _read_arrays(path)
    try:
        return _checkpoint_from(path, meta, arrays, base, fingerprint)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise GGTrainError(f"{path}: corrupt checkpoint (bad or missing metadata: {type(e).__name__} {e})") from None


def _checkpoint_from(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray], base: ModelFile | None,
                     fingerprint: str | None) -> Checkpoint:
    if int(meta.get("version", 0)) > VERSION:
        raise GGTrainError(f"{path}: checkpoint format version {meta['version']} is newer than this "
                           f"ggtrain reads ({VERSION}); upgrade ggtrain")
    sums = meta.get("sha256", {})
    if set(sums) != set(arrays):
        raise GGTrainError(f"{path}: corrupt checkpoint (members {sorted(arrays)}, expected {sorted(sums)})")
    for k, a in arrays.items():
        if _sha(a) != sums[k]:
            raise GGTrainError(f"{path}: corrupt checkpoint (checksum of '{k}' does not match)")

    want = fingerprint if fingerprint is not None else (base.fingerprint() if base is not None else None)
    if want is not None and meta.get("base_fingerprint") != want:
        other = f" {base.path}" if base is not None else ""
        raise GGTrainError(f"{path}: checkpoint was made with base model '{meta.get('base_name') or '?'}' "
                           f"(fingerprint {str(meta.get('base_fingerprint'))[:12]}), not with this base "
                           f"model{other} (fingerprint {want[:12]})")

    flat = arrays["lora"]
    try:
        lora = LoraWeights.from_layout_dict(meta["lora_layout"], np.ascontiguousarray(flat, dtype=np.float32))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise GGTrainError(f"{path}: corrupt checkpoint (LoRA layout does not match the data: {e})") from None
    optimizer = dict(meta.get("optimizer", {}))
    for key in ("m", "v"):
        prefix = f"opt.{key}."
        optimizer[key] = {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}
    return Checkpoint(lora=lora, optimizer=optimizer, step=int(meta["step"]), epoch=int(meta["epoch"]),
                      data_position=meta.get("data_position", {}),
                      config=meta.get("config", {}), base_fingerprint=meta.get("base_fingerprint", ""),
                      base_name=meta.get("base_name", ""), extra=meta.get("extra", {}))
