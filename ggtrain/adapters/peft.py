"""LoRA adapters in Hugging Face PEFT's format: the directory transformers, TGI and vLLM load.

    DIR/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, rank_pattern, ...
    DIR/adapter_model.safetensors  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight (r, in)
                                   base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight (out, r)
PEFT applies y += scale · B·A·x with scale = alpha / r (rsLoRA: alpha / √r), r and alpha per module
from rank_pattern / alpha_pattern (regexes matched against the module's name; the first that
matches wins) or r / lora_alpha. The tensors are those of a GGUF adapter (ggtrain.adapters.gguf_lora) with
two differences, both taken from llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py):
  - names: blk.N.attn_q.weight <-> model.layers.N.self_attn.q_proj (HF_MODULE), output.weight <-> lm_head;
  - llama only (conversion/llama.py LlamaModel.permute; Qwen2/Qwen3/Gemma 2/Gemma 3 keep HF's order):
    the rows of q and k are permuted per head from HF's rotate-half order to ggml's interleaved one.
    A LoRA's rows are its B's, so B is permuted and A is not, as convert_lora_to_gguf does.
GGUF has one alpha per file: per-module alphas and rsLoRA's √r are folded into B on the way in
(ggtrain.adapters.gguf_lora.write_gguf_adapter), and a GGUF adapter's per-tensor scale alpha/r becomes
rank_pattern / alpha_pattern on the way out.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ggtrain.atomic import atomic_path, atomic_write
from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import TARGETS, LoraWeights, target_of, tensor_name

if TYPE_CHECKING:
    from ggtrain.adapters.modelcard import RunRecord

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
PREFIX = "base_model.model."  # PeftModel wraps the HF model: its keys start with this
HF_MODULE = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
HF_TARGET = {path.split(".")[-1]: t for t, path in HF_MODULE.items()} | {"lm_head": "output"}
PERMUTED_ARCHS = ("llama",)  # convert_hf_to_gguf permutes q/k rows for these (of ggtrain's architectures)

# Module names as the HF models of ggtrain's architectures have them: Gemma 3's multimodal class
# puts the text model under language_model (two spellings across transformers versions).
_LAYER_KEY = re.compile(r"^(?:model\.|model\.language_model\.|language_model\.model\.)?layers\.(\d+)\."
                        r"(self_attn|mlp)\.([a-z_]+)$")
_HEAD_KEY = re.compile(r"^(?:language_model\.)?lm_head$")


# -- names and the q/k permutation --------------------------------------------------------------
def module_key(name: str) -> str:
    """GGUF tensor name -> the HF module it adapts: 'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj'."""
    layer, target = target_of(name)
    return "lm_head" if target == "output" else f"model.layers.{layer}.{HF_MODULE[target]}"


def tensor_of_module(key: str) -> str | None:
    """HF module name (without base_model.model.) -> GGUF tensor name, None for a module ggtrain has no name for."""
    if _HEAD_KEY.match(key):
        return "output.weight"
    m = _LAYER_KEY.match(key)
    if m is None:
        return None
    target = HF_TARGET.get(m.group(3))
    if target is None or HF_MODULE.get(target) != f"{m.group(2)}.{m.group(3)}":
        return None
    return tensor_name(target, int(m.group(1)))


def qk_heads(name: str, arch: str, n_head: int, n_head_kv: int) -> int | None:
    """The head count whose rows llama.cpp's converter permutes in tensor `name`, None if it keeps HF's order."""
    if arch not in PERMUTED_ARCHS:
        return None
    target = target_of(name)[1]
    return n_head if target == "attn_q" else n_head_kv if target == "attn_k" else None


def to_ggml_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> ggml's interleaved one (LlamaModel.permute, on a LoRA's B)."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def to_hf_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of to_ggml_rows."""
    return b.reshape(n_head, b.shape[0] // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def pattern_key(patterns: Iterable[str], key: str) -> str | None:
    """The first rank_pattern / alpha_pattern key matching module `key`, as PEFT's get_pattern_key."""
    for p in patterns:
        try:
            if re.match(rf"(.*\.)?({p})$", key):
                return p
        except re.error:
            continue
    return None


# -- safetensors ----------------------------------------------------------------------------------
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as float32, read from the format's header directly:
    the safetensors package's numpy reader has no bfloat16, which adapters trained on GPUs often are."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    except OSError as e:
        raise GGTrainError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(buf) < 8:
        raise GGTrainError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise GGTrainError(f"{path}: not a safetensors file (header of {n} bytes in a {len(buf)}-byte file)")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, ValueError):
        raise GGTrainError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise GGTrainError(f"{path}: not a safetensors file (its header is not a JSON object)")
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise GGTrainError(f"{path}: tensor '{key}' has a malformed header entry") from None
        if dtype not in _ST_DTYPES:
            raise GGTrainError(f"{path}: tensor '{key}' is {dtype}; adapters are read in "
                               f"{', '.join(_ST_DTYPES)}")
        np_type = np.dtype(_ST_DTYPES[dtype])
        count = math.prod(shape)
        if not (0 <= start <= end <= len(buf) - 8 - n) or end - start != count * np_type.itemsize:
            raise GGTrainError(f"{path}: tensor '{key}' lies outside the file (truncated?)")
        raw = np.frombuffer(buf, dtype=np_type, count=count, offset=8 + n + start).reshape(shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(np.float32)
        out[key] = arr
    return out


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write float32 tensors with the safetensors package, atomically; metadata format 'pt' as PEFT writes it."""
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write(path, lambda f: f.write(blob))


# -- reading a PEFT directory -----------------------------------------------------------------------
def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_peft_config(d: Path) -> dict[str, Any]:
    """adapter_config.json, checked for what a GGUF LoRA cannot hold (one line naming the file and key)."""
    cfg_path = d / CONFIG_FILE
    if not d.is_dir():
        raise GGTrainError(f"{d}: no such directory" if not d.exists() else f"{d}: not a directory")
    if not cfg_path.is_file():
        raise GGTrainError(f"{d}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise GGTrainError(f"{cfg_path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise GGTrainError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise GGTrainError(f"{cfg_path}: not a JSON object")

    def refuse(key: str, why: str) -> GGTrainError:
        return GGTrainError(f"{cfg_path}: {key} = {json.dumps(cfg.get(key))}: {why}")

    if cfg.get("peft_type", "LORA") != "LORA":
        raise refuse("peft_type", "only LoRA adapters can be used (a GGUF adapter is a LoRA)")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise refuse("task_type", "ggtrain applies adapters to causal language models (CAUSAL_LM)")
    not_lora = {
        "use_dora": "DoRA's magnitude vectors have no place in a GGUF LoRA (llama.cpp applies B·A only)",
        "modules_to_save": "fully trained modules are not LoRA tensors; a GGUF LoRA cannot hold them",
        "lora_bias": "LoRA biases cannot be represented in a GGUF LoRA",
        "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported by ggtrain",
        "trainable_token_indices": "trained token embeddings cannot be represented in a GGUF LoRA",
        "target_parameters": "LoRA on bare parameters (MoE experts) is not supported",
        "layer_replication": "replicated layers have no counterpart in the base GGUF",
        "use_qalora": "QA-LoRA's pooled input is not what llama.cpp applies",
    }
    for key, why in not_lora.items():
        if cfg.get(key):
            raise refuse(key, why)
    if cfg.get("bias", "none") != "none":
        raise refuse("bias", "trained biases cannot be represented in a GGUF LoRA (only 'none')")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise refuse(key, "expected a number > 0")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                            or not math.isfinite(v) or v <= 0 for v in pat.values()):
            raise refuse(key, "expected an object of module patterns to numbers > 0")
        cfg[key] = pat
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise refuse("use_rslora", "expected true or false")
    return cfg


_NOT_LORA_TENSORS = (
    (".lora_embedding_", "a LoRA on the token embeddings is not supported by ggtrain"),
    (".lora_magnitude_vector", "DoRA's magnitude vectors have no place in a GGUF LoRA"),
    (".lora_B.bias", "LoRA biases cannot be represented in a GGUF LoRA"),
    ("trainable_tokens_", "trained token embeddings cannot be represented in a GGUF LoRA"),
)


def read_peft_adapter(d: str | os.PathLike, base: ModelFile,
                      scale: float = 1.0) -> tuple[LoraWeights, float, dict[str, Any]]:
    """Read a PEFT LoRA directory for `base` -> (LoraWeights, lora_alpha, adapter_config).

    Each entry's alpha makes its scale PEFT's: alpha_t / r_t, or alpha_t / √r_t with rsLoRA (times
    `scale`, the --lora ADAPTER:SCALE factor). B is in ggml's row order (q/k permuted for llama).
    Anything the GGUF format or ggtrain cannot apply, and any tensor that does not fit `base`, is
    a GGTrainError naming the file and the key.
    """
    from ggtrain.gguf.arch import read_hparams

    d = Path(d)
    cfg = read_peft_config(d)
    wpath = d / WEIGHTS_FILE
    if not wpath.is_file():
        other = " (only adapter_model.bin: re-save it with safe_serialization=True)" \
            if (d / "adapter_model.bin").is_file() else ""
        raise GGTrainError(f"{d}: no {WEIGHTS_FILE}{other}")
    hp = read_hparams(base)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    keys: dict[str, str] = {}
    for key, arr in read_safetensors(wpath).items():
        for marker, why in _NOT_LORA_TENSORS:
            if marker in key:
                raise GGTrainError(f"{wpath}: tensor '{key}': {why}")
        m = re.match(r"^(.*)\.lora_([AB])\.weight$", key)
        if m is None:
            if key.endswith(".base_layer.weight"):  # a copy of the base weight: convert_lora_to_gguf skips it too
                continue
            raise GGTrainError(f"{wpath}: tensor '{key}' is not a LoRA matrix (.lora_A.weight / .lora_B.weight): "
                               "fully trained modules (modules_to_save, resized embeddings, norms) cannot be "
                               "represented in a GGUF LoRA")
        module = m.group(1).removeprefix(PREFIX)
        name = tensor_of_module(module)
        if name is None:
            raise GGTrainError(f"{wpath}: tensor '{key}': ggtrain cannot apply a LoRA to module '{module}' "
                               f"(it adapts {', '.join(sorted(HF_TARGET))})")
        if name == "output.weight" and hp.tied_output:
            raise GGTrainError(f"{wpath}: tensor '{key}': a LoRA on lm_head, but the base model {base.path} ties its "
                               "output head to the token embeddings, where llama.cpp cannot apply it")
        if not np.isfinite(arr).all():
            raise GGTrainError(f"{wpath}: tensor '{key}' holds NaN or inf values")
        pairs.setdefault(name, {})[m.group(2)] = arr
        keys[name] = module

    if not pairs:
        raise GGTrainError(f"{wpath}: no LoRA tensors")
    layout: dict[str, tuple[int, int, int, float, float]] = {}
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in sorted(pairs, key=_forward_order):
        module, ab = keys[name], pairs[name]
        where = f"{wpath}: '{PREFIX}{module}'"
        if len(ab) != 2:
            raise GGTrainError(f"{where} has lora_{'A' if 'A' in ab else 'B'} but no lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise GGTrainError(f"{where}: lora_A is {a.shape} and lora_B {b.shape}; expected (r, in) and (out, r)")
        r = a.shape[0]
        t = base.tensors.get(name)
        if t is None:
            raise GGTrainError(f"{where}: the base model {base.path} has no tensor {name} (an adapter for another "
                               "model?)")
        if tuple(t.shape) != (b.shape[0], a.shape[1]):
            raise GGTrainError(f"{where} is {b.shape[0]} x {a.shape[1]} (out x in), but {name} of the base model "
                               f"{base.path} is {t.shape[0]} x {t.shape[1]} (an adapter for another model?)")
        r_key = pattern_key(cfg["rank_pattern"], module)
        want_r = cfg["rank_pattern"][r_key] if r_key is not None else cfg["r"]
        if r != want_r:
            said = f"rank_pattern['{r_key}']" if r_key is not None else "r"
            raise GGTrainError(f"{where}: lora_A has rank {r}, but {d / CONFIG_FILE} says {said} = {want_r}")
        a_key = pattern_key(cfg["alpha_pattern"], module)
        alpha = float(cfg["alpha_pattern"][a_key] if a_key is not None else cfg["lora_alpha"])
        if cfg.get("use_rslora"):
            alpha *= math.sqrt(r)  # PEFT: alpha / sqrt(r) = (alpha * sqrt(r)) / r
        heads = qk_heads(name, hp.arch, hp.n_head, hp.n_head_kv)
        if heads is not None:
            b = to_ggml_rows(b, heads)
        layout[name] = (b.shape[0], a.shape[1], r, scale * alpha, 0.0)
        arrays[name] = (a, b)
    lora = LoraWeights(layout)
    for name, (a, b) in arrays.items():
        lora[name].A[...] = a
        lora[name].B[...] = b
    return lora, float(cfg["lora_alpha"]), cfg


def _forward_order(name: str) -> tuple[int, int]:
    layer, target = target_of(name)
    return (1 << 30 if layer is None else layer, TARGETS.index(target))


def most_common(values: Iterable[float]) -> float:
    """The value most entries share (the first of equals): the file-wide r / alpha, the rest are patterns."""
    return Counter(values).most_common(1)[0][0]


# -- writing a PEFT directory -----------------------------------------------------------------------
def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _patterns(values: Mapping[str, float], default: float) -> dict[str, int | float]:
    """rank_pattern / alpha_pattern for per-module values (module key -> value) differing from the
    default: a projection's own name ('q_proj') where all its layers agree, else one key per layer."""
    by_proj: dict[str, dict[str, float]] = {}
    for key, v in values.items():
        by_proj.setdefault(key.rsplit(".", 1)[-1], {})[key] = v
    out: dict[str, int | float] = {}
    for proj, per_layer in by_proj.items():
        distinct = set(per_layer.values())
        if len(distinct) == 1:
            v = distinct.pop()
            if v != default:
                out[proj] = _number(v)
            continue
        for key, v in per_layer.items():
            if v != default:
                out[key] = _number(v)
    return out


def peft_config(lora: LoraWeights, base_model: str | None, n_layer: int, dropout: float = 0.0) -> dict[str, Any]:
    """adapter_config.json for `lora` (entries' rank and alpha as their scale alpha/r)."""
    keys = {name: module_key(name) for name in lora.names}
    ranks = {keys[n]: float(e.rank) for n, e in lora.entries.items()}
    alphas = {keys[n]: e.alpha for n, e in lora.entries.items()}
    r, alpha = most_common(ranks.values()), most_common(alphas.values())
    projs = [p for p in (*(HF_MODULE[t].split(".")[-1] for t in TARGETS[:-1]), "lm_head")
             if any(k.rsplit(".", 1)[-1] == p for k in keys.values())]
    exclude = []  # a projection adapted in some layers only: PEFT must not add it to the others
    for t in TARGETS[:-1]:
        present = {target_of(n)[0] for n in lora.names if target_of(n)[1] == t}
        if present:
            exclude += [f"model.layers.{il}.{HF_MODULE[t]}" for il in range(n_layer) if il not in present]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": int(r),
        "lora_alpha": _number(alpha),
        "target_modules": projs,
        "exclude_modules": exclude or None,
        "rank_pattern": {k: int(v) for k, v in _patterns(ranks, r).items()},
        "alpha_pattern": _patterns(alphas, alpha),
        "lora_dropout": float(dropout),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def peft_tensors(lora: LoraWeights, arch: str, n_head: int | None, n_head_kv: int | None) -> dict[str, np.ndarray]:
    """PEFT's tensors of `lora`: A as it is, B in HF's row order."""
    out = {}
    for name, e in lora.entries.items():
        key = PREFIX + module_key(name)
        b = e.B
        heads = qk_heads(name, arch, n_head or 0, n_head_kv or 0)
        if heads is not None:
            if not heads:
                raise GGTrainError(f"the {arch} adapter's q/k rows must be put back in Hugging Face's order, which "
                                   "needs the base model's head counts: give -m BASE.gguf")
            b = to_hf_rows(b, heads)
        out[key + ".lora_A.weight"] = e.A
        out[key + ".lora_B.weight"] = b
    return out


_HF_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+?)/?$")


def base_model_id(adapter_meta: Mapping[str, Any], base: ModelFile | None,
                  given: str | None = None) -> tuple[str | None, str]:
    """base_model_name_or_path and where it came from: --base-model-id; the Hugging Face repository
    the adapter's general.base_model.0 or the base's general.source points at; else a name
    (the base's general.name, the adapter's general.base_model.0.name), which loaders cannot fetch."""
    if given:
        return given, "--base-model-id"
    meta = dict(base.metadata) if base is not None else {}
    for src, key in (("adapter", "general.base_model.0.repo_url"), ("base", "general.source.repo_url"),
                     ("base", "general.source.url"), ("base", "general.source.huggingface.repository")):
        v = (adapter_meta if src == "adapter" else meta).get(key)
        if isinstance(v, str):
            m = _HF_URL.match(v.strip())
            if m:
                return m.group(1), f"{key} of the {src}"
            if key.endswith("huggingface.repository") and v.count("/") == 1:
                return v.strip(), f"{key} of the {src}"
    org, name = adapter_meta.get("general.base_model.0.organization"), adapter_meta.get("general.base_model.0.name")
    for v, where in ((meta.get("general.name"), "general.name of the base"),
                     (f"{org}/{name}" if isinstance(org, str) and isinstance(name, str) else None,
                      "general.base_model.0 of the adapter"),
                     (name, "general.base_model.0.name of the adapter")):
        if isinstance(v, str) and v.strip():
            return v.strip(), where
    return None, "nowhere"


def write_peft_dir(outdir: Path, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], card: str,
                   overwrite: bool = False) -> list[Path]:
    """adapter_model.safetensors, adapter_config.json and README.md into outdir (each atomically)."""
    files = [outdir / WEIGHTS_FILE, outdir / CONFIG_FILE, outdir / CARD_FILE]
    if outdir.exists() and not outdir.is_dir():
        raise GGTrainError(f"{outdir}: exists and is not a directory")
    there = [f.name for f in files if f.exists()]
    if there and not overwrite:
        raise GGTrainError(f"{outdir}: already holds {', '.join(there)} (add --overwrite to replace them)")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GGTrainError(f"{outdir}: cannot create the directory: {e.strerror or e}") from None
    write_safetensors(files[0], tensors)
    atomic_write(files[1], lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    with atomic_path(files[2]) as tmp:
        tmp.write_text(card, encoding="utf-8")
    return files


# -- the two directions ---------------------------------------------------------------------------
def export_peft(adapter: Path, outdir: Path, base: ModelFile | None = None, base_id: str | None = None,
                overwrite: bool = False, run_of: Callable[[Path, int | None], RunRecord] | None = None
                ) -> tuple[list[Path], dict[str, Any], list[str]]:
    """GGUF LoRA adapter -> PEFT directory. Returns (files written, adapter_config, notes for the user).

    run_of(adapter, steps): what the run that wrote the adapter tells for the model card (the
    training stage's ggtrain.train.outputs.run_record; None: the adapter's own metadata only).
    With `base`, the adapter is checked against it and its head counts give llama's q/k order;
    without, an adapter whose B rows need them is refused.
    """
    from ggtrain.adapters.gguf_lora import read_gguf_adapter
    from ggtrain.adapters.modelcard import RunRecord, peft_card
    from ggtrain.gguf.arch import read_hparams

    lora, _, meta = read_gguf_adapter(adapter, base=base)
    arch = str(meta["general.architecture"])
    hp = read_hparams(base) if base is not None else None
    notes = []
    if "output.weight" in lora and hp is not None and hp.tied_output:
        raise GGTrainError(f"{adapter}: has a LoRA on output.weight, but the base model {base.path} ties its "
                           "head to the token embeddings")
    try:
        tensors = peft_tensors(lora, arch, hp.n_head if hp else None, hp.n_head_kv if hp else None)
    except GGTrainError as e:
        raise GGTrainError(f"{adapter}: {e}") from None
    bid, source = base_model_id(meta, base, base_id)
    if bid is None:
        notes.append("base_model_name_or_path is null: give --base-model-id ORG/NAME (the Hugging Face model "
                     "the base GGUF was made from), which TGI and vLLM load the base by")
    elif "/" not in bid:
        notes.append(f"base_model_name_or_path is '{bid}' (from {source}), not a Hugging Face id: give "
                     "--base-model-id ORG/NAME for loaders to find the base")
    steps = meta.get("training.steps")
    run = run_of(adapter, steps if isinstance(steps, int) else None) if run_of is not None else RunRecord()
    lora_cfg = run.config.get("lora") or {}
    dropout = next((float(v.get("dropout", 0.0)) for v in lora_cfg.values() if isinstance(v, dict)), 0.0)
    # Without the base, the layers are those the adapter has (a gap in them is still excluded).
    n_layer = hp.n_layer if hp else 1 + max((target_of(n)[0] or 0) for n in lora.names)
    config = peft_config(lora, bid, n_layer, dropout=dropout)
    ignored = meta.get("ggtrain.ignored_tensors") or []
    if ignored:
        notes.append(f"left out {len(ignored)} norm tensor(s) of the adapter, which llama.cpp ignores too")
    title = str(meta.get("general.name") or outdir.name)
    card = peft_card(title=title, base_id=bid, base_file=base.path.name if base is not None else
                     meta.get("ggtrain.adapter.base_file"), arch=arch, config=config, n_params=lora.n_params,
                     adapter_file=adapter.name, adapter_meta=meta, run=run, dir_name=outdir.resolve().name)
    return write_peft_dir(outdir, tensors, config, card, overwrite=overwrite), config, notes


def import_peft(d: Path, base: ModelFile, out: Path, dtype: str = "f32") -> tuple[Path, LoraWeights, float]:
    """PEFT directory -> GGUF LoRA adapter for `base` (what convert_lora_to_gguf.py writes).
    Returns (out, the LoRA as read, the file's alpha)."""
    from ggtrain.adapters.gguf_lora import write_gguf_adapter

    lora, _, _ = read_peft_adapter(d, base)
    # The alpha most entries share becomes the file's; the other entries' alphas are folded into B.
    alpha = most_common(e.alpha for e in lora.entries.values())
    return write_gguf_adapter(out, lora, base, alpha=alpha, dtype=dtype, name=d.resolve().name), lora, alpha
