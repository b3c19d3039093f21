"""LoRA adapters in llama.cpp's GGUF format: write what `llama-cli --lora` loads, read them back.

The format (llama.cpp src/llama-adapter.cpp, convert_lora_to_gguf.py):
    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (f32),
    general.architecture = the base model's (llama.cpp refuses any other)
    for each adapted base tensor NAME.weight: NAME.weight.lora_a, ggml shape [in, r] (numpy (r, in) = A)
                                              NAME.weight.lora_b, ggml shape [r, out] (numpy (out, r) = B)
llama.cpp applies y += s · alpha / r · B·A·x, r = lora_b's ne[0] per tensor, s the user's scale
(--lora-scaled F:S, default 1); alpha 0 means no alpha/r factor at all. There is one alpha per file,
so a per-target alpha is folded into that target's B on writing (B · alpha_t / alpha_file).

What else an adapter says about itself (llama.cpp ignores these keys; `ggtrain info` shows them):
    general.name                   "<base name> LoRA"
    general.basename, .size_label  the base's (GGUF naming: <basename>-<size label>-LoRA.gguf)
    general.base_model.count = 1   the model the adapter was trained on, as GGUF lineage:
    general.base_model.0.*         name, author, version, organization, description, url, doi, uuid,
                                   repo_url: each copied from the base's general.<field> where it has
                                   one (name falls back to the base's file name). Only the direct
                                   parent: when the base is itself a fine-tune, its own
                                   general.base_model.* stay in the base's file.
    ggtrain.version                ggtrain's version that wrote the file
    ggtrain.adapter.base_file      the base's file name
    ggtrain.adapters.gguf_lora.base_fingerprint   ModelFile.fingerprint() of the base: tensor table + sampled
                                   bytes. Another file with the same shapes but another fingerprint
                                   gets a note (another quantization of the same model is fine)
    ggtrain.adapters.gguf_lora.targets        [string] adapted targets in TARGETS order (attn_q, ..., output)
    ggtrain.adapters.gguf_lora.ranks          [u32] their ranks, same order (the largest where layers differ)
    ggtrain.adapter.note           set when per-target alphas were folded into lora_b
    training.*                     the run's figures, from the trainer (extra_meta):
        training.steps, training.epochs       optimizer steps done, epochs completed
        training.compute                      the base products' path: f32 or bf16 (--compute)
        training.tokens, training.trained_tokens   tokens processed, target tokens trained
        training.loss                         mean loss of the last step
        training.loss_smoothed                the progress bar's smoothed loss
        training.val_loss                     the last validation loss (absent without validation)
        training.data, training.data_sha256   the training data's file name and sha256 (for a directory:
                                              the run's digest of its files' names and bytes)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as QT

from ggtrain import __version__
from ggtrain.atomic import atomic_path
from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile, type_name
from ggtrain.model.lora import TARGETS, LoraWeights, target_of

ADAPTER_DTYPES = ("f32", "f16", "q8_0")
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

KEY_VERSION = "ggtrain.version"
KEY_BASE_FILE = "ggtrain.adapter.base_file"
KEY_BASE_FINGERPRINT = "ggtrain.adapters.gguf_lora.base_fingerprint"
KEY_TARGETS = "ggtrain.adapters.gguf_lora.targets"
KEY_RANKS = "ggtrain.adapters.gguf_lora.ranks"
KEY_NOTE = "ggtrain.adapter.note"
# general.base_model.{i}.<field> <- the parent's general.<field> (gguf-py's Keys.General.BASE_MODEL_*)
LINEAGE_FIELDS = ("name", "author", "version", "organization", "description", "url", "doi", "uuid",
                  "repo_url")


def lineage(meta: Mapping[str, Any], path: Path) -> dict[str, str]:
    """A parent's fields for its child's general.base_model.{i}.*, from the parent's metadata:
    field -> value (the name falls back to the file's stem)."""
    out = {f: v for f in LINEAGE_FIELDS if isinstance(v := meta.get(f"general.{f}"), str) and v}
    out.setdefault("name", path.stem)
    return out


def add_lineage(w: gguf.GGUFWriter, parents: list[Mapping[str, str]]) -> None:
    """Write general.base_model.count and .{i}.* for each parent (as lineage() gives them)."""
    w.add_uint32(gguf.Keys.General.BASE_MODEL_COUNT, len(parents))
    for i, fields in enumerate(parents):
        for f, v in fields.items():
            w.add_string(f"general.base_model.{i}.{f}", v)


def target_ranks(names_ranks: Mapping[str, int]) -> dict[str, list[int]]:
    """tensor name -> rank  =>  target -> the ranks of its tensors, targets in TARGETS order."""
    by_target: dict[str, list[int]] = {}
    for name, r in names_ranks.items():
        by_target.setdefault(target_of(name)[1], []).append(int(r))
    return {t: by_target[t] for t in TARGETS if t in by_target}


def _encode(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, QT | None]:
    """(data, raw_dtype) for GGUFWriter.add_tensor. q8_0 needs rows of 32k values; other rows (e.g.
    lora_b's rows of r values) fall back to f16, as llama.cpp's converter does."""
    if dtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32), None
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), QT.Q8_0), QT.Q8_0
    return np.ascontiguousarray(arr, dtype=np.float16), None


def write_gguf_adapter(path: str | os.PathLike, lora: LoraWeights, base: ModelFile, alpha: float | None = None,
                       dtype: str = "f32", name: str | None = None,
                       extra_meta: Mapping[str, str | int | float | bool] | None = None) -> Path:
    """Write `lora` as a llama.cpp GGUF LoRA adapter for `base`, atomically; return the path.

    alpha: the file's adapter.lora.alpha (default: the entries' alpha when they share one, else the
    first entry's; the others are folded into their B). dtype: f32 | f16 | q8_0.
    extra_meta: more string/number keys (e.g. "training.steps"), written as they are.
    """
    path = Path(path)
    if dtype not in ADAPTER_DTYPES:
        raise GGTrainError(f"adapter type '{dtype}' is not one of {', '.join(ADAPTER_DTYPES)}")
    if len(lora) == 0:
        raise GGTrainError(f"{path}: the adapter has no tensors")
    if not np.isfinite(lora.flat).all():  # a diverged run: never let a NaN reach llama.cpp
        bad = next(n for n, e in lora.entries.items() if not (np.isfinite(e.A).all() and np.isfinite(e.B).all()))
        raise GGTrainError(f"refusing to write {path}: the LoRA weights of '{bad}' are not finite (NaN/inf)")
    arch = base.architecture
    for tname, e in lora.entries.items():
        t = base.tensors.get(tname)
        if t is None:
            raise GGTrainError(f"{path}: LoRA tensor '{tname}' does not exist in the base model {base.path}")
        if tuple(t.shape) != (e.B.shape[0], e.A.shape[1]):
            raise GGTrainError(f"{path}: LoRA of '{tname}' is {(e.B.shape[0], e.A.shape[1])}, the base model "
                               f"{base.path} has {tuple(t.shape)}")
    alphas = {e.alpha for e in lora.entries.values()}
    file_alpha = float(alpha) if alpha is not None else next(iter(lora.entries.values())).alpha
    if file_alpha <= 0:
        raise GGTrainError(f"{path}: adapter alpha must be > 0, got {file_alpha}")
    parent = lineage(base.metadata, base.path)
    if name is None:
        name = f"{parent['name']} LoRA"
    ranks = target_ranks({n: e.rank for n, e in lora.entries.items()})

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, file_alpha)
        w.add_name(name)
        for key in ("general.basename", "general.size_label"):
            if isinstance(v := base.get(key), str) and v:
                w.add_string(key, v)
        w.add_file_type(_FILE_TYPE[dtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_lineage(w, [parent])
        w.add_string(KEY_VERSION, __version__)
        w.add_string(KEY_BASE_FILE, base.path.name)
        w.add_string(KEY_BASE_FINGERPRINT, base.fingerprint())
        w.add_array(KEY_TARGETS, list(ranks))
        w.add_key_value(KEY_RANKS, [max(r) for r in ranks.values()], gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.UINT32)
        if len(alphas) > 1:
            w.add_string(KEY_NOTE, "per-target alpha folded into lora_b")
        for k, v in (extra_meta or {}).items():
            if isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, int):
                w.add_int64(k, v)
            elif isinstance(v, float):
                w.add_float32(k, v)
            else:
                w.add_string(k, str(v))
        for tname, e in lora.entries.items():
            B = e.B if e.alpha == file_alpha else e.B * np.float32(e.alpha / file_alpha)
            for suffix, arr in (("lora_a", e.A), ("lora_b", B)):
                data, raw = _encode(arr, dtype)
                w.add_tensor(f"{tname}.{suffix}", data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _as_f32(path: Path, t: Any) -> np.ndarray:
    """A tensor of the adapter as float32 in numpy shape."""
    if t.qtype == QT.F32:
        return t.data.view(np.float32).reshape(t.shape).copy()
    if t.qtype == QT.F16:
        return t.data.view(np.float16).reshape(t.shape).astype(np.float32)
    try:
        return gguf.quants.dequantize(t.data, t.qtype).reshape(t.shape).astype(np.float32, copy=False)
    except (NotImplementedError, ValueError, KeyError):
        raise GGTrainError(f"{path}: tensor '{t.name}' has type {type_name(t.qtype)}, which ggtrain cannot "
                           "read in an adapter") from None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def trained_on(meta: Mapping[str, Any]) -> str:
    """How an adapter's metadata names its base, for messages: "'Gemma 3 270m' (gemma.gguf)", or ""."""
    name, file = meta.get("general.base_model.0.name"), meta.get(KEY_BASE_FILE)
    parts = [f"'{name}'" if isinstance(name, str) and name else "",
             f"({file})" if isinstance(file, str) else ""]
    return " ".join(p for p in parts if p)


def _trained_on(meta: Mapping[str, Any]) -> str:
    """' (the adapter was trained on ...)' for a refusal, when the adapter says."""
    what = trained_on(meta)
    return f" (the adapter was trained on {what})" if what else " (an adapter for another model?)"


def base_note(path: str | os.PathLike, meta: Mapping[str, Any], base: ModelFile) -> str | None:
    """The note for an adapter that fits `base` (same architecture and shapes) but was trained on
    another file (its recorded fingerprint differs), or None. Adapters without a fingerprint (older
    ones, llama.cpp's converter's) get none: there is nothing to compare."""
    fp = meta.get(KEY_BASE_FINGERPRINT)
    if not isinstance(fp, str) or not fp or fp == base.fingerprint():
        return None
    this = base.get("general.name")
    this = f"'{this}'" if isinstance(this, str) and this else f"'{base.path.stem}'"
    other_name = meta.get("general.base_model.0.name")
    names = " (another name, too: check it is the same model)" if isinstance(other_name, str) and \
        f"'{other_name}'" != this else ""
    return (f"note: {path} was trained on {trained_on(meta) or 'another base'} (fingerprint {fp[:12]}), "
            f"this base {base.path} is {this} (fingerprint {base.fingerprint()[:12]}){names}: fine if it is "
            "another quantization of the same model")


def read_gguf_adapter(path: str | os.PathLike, base: ModelFile | None = None, scale: float = 1.0,
                      warn: Callable[[str], None] | None = _say) -> tuple[LoraWeights, float, dict[str, Any]]:
    """Read a llama.cpp GGUF LoRA adapter -> (LoraWeights, file alpha, metadata).

    Each entry's alpha is set so that its scale is what llama.cpp applies: scale · alpha / r (or
    scale alone when the file's alpha is 0); `scale` is the --lora-scaled factor. With `base`, the
    adapter is checked against it the way llama.cpp does (architecture, tensor names, shapes): the
    first mismatch is a GGTrainError naming both files and the tensor, instead of a crash later.
    One that fits but was trained on another base file (base_note) is passed to `warn` (default:
    printed to stderr; None: silent) — another quantization of the same model is legitimate.
    """
    path = Path(path)
    mf = ModelFile(path, check_types=False)
    try:
        meta = dict(mf.metadata)
        gtype = meta.get("general.type")
        if gtype != "adapter":
            what = "a model" if gtype in (None, "model") and "token_embd.weight" in mf.tensors else \
                f"general.type = {gtype!r}"
            raise GGTrainError(f"{path}: not a LoRA adapter ({what}; expected general.type = 'adapter')")
        if meta.get("adapter.type") != "lora":
            raise GGTrainError(f"{path}: adapter.type is {meta.get('adapter.type')!r}, only 'lora' is supported")
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise GGTrainError(f"{path}: no general.architecture in the adapter")
        if base is not None and arch != base.architecture:
            raise GGTrainError(f"{path}: adapter is for architecture '{arch}', the base model {base.path} is "
                               f"'{base.architecture}'{_trained_on(meta)}")
        alpha = float(meta.get("adapter.lora.alpha", 0.0))

        pairs: dict[str, dict[str, Any]] = {}
        ignored = []
        for tname, t in mf.tensors.items():
            for suffix in ("lora_a", "lora_b"):
                if tname.endswith("." + suffix):
                    pairs.setdefault(tname[:-len(suffix) - 1], {})[suffix] = t
                    break
            else:
                if tname.endswith("_norm.weight"):  # llama.cpp skips these too
                    ignored.append(tname)
                    continue
                raise GGTrainError(f"{path}: tensor '{tname}' is neither a .lora_a nor a .lora_b tensor")
        if not pairs:
            raise GGTrainError(f"{path}: the adapter has no LoRA tensors")

        layout = {}
        arrays = {}
        for bname, ab in pairs.items():
            if len(ab) != 2:
                raise GGTrainError(f"{path}: LoRA tensor pair for '{bname}' is missing its "
                                   f"{'lora_b' if 'lora_a' in ab else 'lora_a'}")
            if bname == "token_embd.weight":
                raise GGTrainError(f"{path}: a LoRA on token_embd.weight is not supported by ggtrain")
            try:
                target_of(bname)
            except GGTrainError as e:
                raise GGTrainError(f"{path}: {e}") from None
            ta, tb = ab["lora_a"], ab["lora_b"]
            if len(ta.shape) != 2 or len(tb.shape) != 2 or ta.shape[0] != tb.shape[1]:
                raise GGTrainError(f"{path}: '{bname}' has lora_a {ta.shape} and lora_b {tb.shape} (numpy order); "
                                   "expected (r, in) and (out, r)")
            r, n_in = ta.shape
            n_out = tb.shape[0]
            if base is not None:
                bt = base.tensors.get(bname)
                if bt is None:
                    tied = " (the base ties its output head to token_embd: llama.cpp cannot apply this one " \
                        "either)" if bname == "output.weight" and "token_embd.weight" in base.tensors else ""
                    raise GGTrainError(f"{path}: LoRA tensor '{bname}' does not exist in the base model "
                                       f"{base.path}{tied or _trained_on(meta)}")
                if tuple(bt.shape) != (n_out, n_in):
                    raise GGTrainError(f"{path}: LoRA of '{bname}' is {(n_out, n_in)}, the base model "
                                       f"{base.path} has {tuple(bt.shape)}{_trained_on(meta)}")
            entry_alpha = scale * (alpha if alpha else r)  # llama.cpp: alpha ? s·alpha/r : s
            layout[bname] = (n_out, n_in, r, entry_alpha, 0.0)
            arrays[bname] = (_as_f32(path, ta), _as_f32(path, tb))
    finally:
        mf.close()

    for bname, pair in arrays.items():
        for suffix, arr in zip(("lora_a", "lora_b"), pair):
            if not np.isfinite(arr).all():
                raise GGTrainError(f"{path}: tensor '{bname}.{suffix}' holds NaN or inf values (an adapter "
                                   "from a run that diverged?); it cannot be used")
    lora = LoraWeights(layout)
    for bname, (a, b) in arrays.items():
        lora[bname].A[...] = a
        lora[bname].B[...] = b
    meta["ggtrain.ignored_tensors"] = ignored
    if base is not None and warn is not None and (note := base_note(path, meta, base)):
        warn(note)
    return lora, alpha, meta


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """'adapter.gguf' -> (path, 1.0); 'adapter.gguf:0.5' -> (path, 0.5) (llama.cpp's --lora-scaled F:S)."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(arg), 1.0
