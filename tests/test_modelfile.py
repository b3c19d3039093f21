"""ggtrain.gguf.modelfile / ggtrain.gguf.arch against gguf-py's reader and llama.cpp's own loader.

Every tensor's type, shape, offset and bytes must equal what gguf.GGUFReader reports, views must
point straight into the mapping, metadata must equal gguf-py's; hparams must equal what the tiny
models were written with and what llama.cpp prints when it loads the same file; broken files must
raise GGTrainError naming the file.
"""

from __future__ import annotations

import math
import struct
from functools import cache
from pathlib import Path

import gguf
import llamacpp
import numpy as np
import pytest
import tinymodels
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QT

from ggtrain.errors import GGTrainError
from ggtrain.gguf.arch import ROPE_NEOX, ROPE_NORM, read_hparams
from ggtrain.gguf.modelfile import ModelFile

# Tiny models whose files are read here: every arch in Q4_K, plus more types on the small vocab.
# (qwen2 shares qwen3's 150k-token BPE vocab, slow for gguf-py to read: its hparams are checked below.)
TINY = [(a, "Q4_K") for a in tinymodels.ARCHS if a != "qwen2"] + [
    ("llama", "F32"), ("llama", "Q8_0"), ("llama", "F16"), ("gemma3", "Q8_0"), ("gemma2", "BF16")]


@cache
def _reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


@cache
def _load_info(path: Path) -> dict:
    return llamacpp.load_info(path)


def _model_path(spec, gemma_path: Path) -> Path:
    return gemma_path if spec == "gemma" else tinymodels.tiny_model(*spec)


MODELS = ["gemma", *TINY]
IDS = ["gemma3-270m" if m == "gemma" else f"{m[0]}-{m[1]}" for m in MODELS]


# -- tensors and metadata against gguf-py --------------------------------------------------------
@pytest.mark.parametrize("spec", MODELS, ids=IDS)
def test_tensors_match_gguf_reader(spec, gemma_path):
    path = _model_path(spec, gemma_path)
    reader = _reader(path)
    mf = ModelFile(path)
    assert set(mf.tensors) == {t.name for t in reader.tensors}
    whole = np.frombuffer(mf._mmap, dtype=np.uint8)  # the mapping itself
    base = whole.ctypes.data
    for rt in reader.tensors:
        t = mf.tensors[rt.name]
        qt = QT(rt.tensor_type)
        assert t.qtype == qt, rt.name
        assert t.shape == tuple(int(d) for d in reversed(rt.shape)), rt.name
        assert t.nbytes == rt.n_bytes and t.offset == rt.data_offset, rt.name
        assert t.n_elements == rt.n_elements
        block, type_size = GGML_QUANT_SIZES[qt]
        assert t.data.shape == (t.rows, t.cols // block * type_size) and t.data.dtype == np.uint8
        # Same bytes as gguf-py reads...
        assert np.array_equal(t.data.reshape(-1), np.asarray(rt.data).view(np.uint8).reshape(-1))
        # ...and no copy: a read-only view at the tensor's place in the mapping.
        assert t.data.ctypes.data == base + t.offset, rt.name
        assert np.shares_memory(t.data, whole)
        assert not t.data.flags.owndata and not t.data.flags.writeable
    assert mf.data_offset == reader.data_offset


def _same(a, b) -> bool:
    if isinstance(b, list) and b and isinstance(b[0], str):
        return list(a) == b
    if isinstance(b, list) or isinstance(a, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("spec", MODELS, ids=IDS)
def test_metadata_matches_gguf_reader(spec, gemma_path):
    path = _model_path(spec, gemma_path)
    reader = _reader(path)
    mf = ModelFile(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(mf.metadata) == set(fields)
    for key, field in fields.items():
        assert _same(mf.metadata[key], field.contents()), key
    assert mf.version == reader.fields["GGUF.version"].contents()
    assert mf.alignment == reader.alignment
    assert mf.architecture == reader.fields["general.architecture"].contents()


# -- hparams --------------------------------------------------------------------------------------
def _check_against_llamacpp(hp, info: dict) -> None:
    """read_hparams' view of a file == the values llama.cpp printed loading it."""
    assert info["arch"] == hp.arch
    for ours, theirs in ((hp.n_embd, "n_embd"), (hp.n_layer, "n_layer"), (hp.n_head, "n_head"),
                         (hp.n_head_kv, "n_head_kv"), (hp.head_dim, "n_embd_head_k"),
                         (hp.head_dim_v, "n_embd_head_v"), (hp.n_ff, "n_ff"), (hp.n_rot, "n_rot"),
                         (hp.n_swa, "n_swa"), (hp.n_vocab, "n_vocab"),
                         (hp.n_ctx_train, "n_ctx_train"), (hp.rope_type, "rope type"),
                         (hp.rope_scaling_orig_ctx, "n_ctx_orig_yarn")):
        assert ours == int(info[theirs]), theirs
    assert hp.rope_freq_base == pytest.approx(float(info["freq_base_train"]), abs=0.06)
    assert hp.rope_freq_scale == pytest.approx(float(info["freq_scale_train"]), rel=1e-5)
    # llama.cpp names "no scaling" linear with scale 1.
    scaling = "linear" if hp.rope_scaling_type == "none" else hp.rope_scaling_type
    assert info["rope scaling"] == scaling
    assert hp.norm_eps == pytest.approx(float(info["f_norm_rms_eps"]), rel=0.05)  # printed %.1e
    assert [hp.is_swa(il) for il in range(hp.n_layer)] == info["is_swa"]
    if "freq_base_swa" in info:
        assert hp.rope_freq_base_swa == pytest.approx(float(info["freq_base_swa"]), abs=0.06)
        assert hp.rope_freq_scale_swa == pytest.approx(float(info["freq_scale_swa"]), rel=1e-5)
    f_attn_scale = float(info["f_attn_scale"])  # 0 = llama.cpp's default 1/sqrt(head_dim)
    want = f_attn_scale if f_attn_scale else 1 / math.sqrt(hp.head_dim)
    assert hp.attn_scale == pytest.approx(want, rel=0.05)  # printed %.1e


def test_gemma3_270m_hparams_match_llamacpp(gemma_path):
    mf = ModelFile(gemma_path)
    hp = read_hparams(mf)
    _check_against_llamacpp(hp, _load_info(gemma_path))
    assert hp.arch == "gemma3"
    assert hp.tied_output == ("output.weight" not in mf.tensors)
    assert hp.has_qk_norm and hp.has_post_norms and hp.ffn_act == "gelu_tanh"
    assert hp.embd_scale == pytest.approx(math.sqrt(hp.n_embd))
    assert sum(hp.swa_layers) < hp.n_layer  # some global layers


# Variants that exercise metadata llama.cpp reads: defaults, scaling types, patterns.
VARIANTS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {},
    "gemma3": {},
    "llama-linear4": {"arch": "llama", "rope_scaling_type": "linear", "rope_scaling_factor": 4.0},
    "llama-yarn": {"arch": "llama", "rope_scaling_type": "yarn", "rope_scaling_factor": 2.0,
                       "rope_scaling_orig_ctx": 1024, "n_head_kv": 1, "rope_freq_base": 500000.0},
    "llama-gqa1": {"arch": "llama", "n_head_kv": 4, "tied": True},
    "qwen3-head128": {"arch": "qwen3", "head_dim": 128, "n_head": 2, "n_head_kv": 1},
    "gemma3-pattern-default": {"arch": "gemma3", "n_layer": 7, "swa_pattern": None,
                                   "rope_freq_base_swa": None},
    "gemma3-pattern-array": {"arch": "gemma3", "n_layer": 3, "swa_pattern": [True, False, True]},
    "gemma3-no-swa": {"arch": "gemma3", "n_swa": None, "swa_pattern": None},
    "gemma2-defaults": {"arch": "gemma2", "n_swa": None, "swa_pattern": None, "attn_softcap": None,
                            "final_softcap": None},
}


def _variant(name: str):
    kw = dict(VARIANTS[name])
    arch = kw.pop("arch", name)
    return arch, kw, tinymodels.tiny_model(arch, "F32", **kw)


@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_hparams(name):
    arch, kw, path = _variant(name)
    cfg = tinymodels.model_config(arch, **kw)
    mf = ModelFile(path)
    hp = read_hparams(mf)
    # Against what was written...
    assert (hp.arch, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff) == (
        arch, cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"],
        cfg["n_ff"])
    assert hp.n_ctx_train == cfg["n_ctx"]
    assert hp.n_vocab == mf.tensors["token_embd.weight"].shape[0] == len(
        mf.metadata["tokenizer.ggml.tokens"])
    assert hp.rope_type == (ROPE_NORM if arch == "llama" else ROPE_NEOX)
    assert hp.rope_freq_base == np.float32(cfg["rope_freq_base"])
    assert hp.norm_eps == np.float32(cfg["norm_eps"])
    assert hp.tied_output == (cfg["tied"] or arch == "gemma2")
    assert hp.has_qk_norm == (arch in ("qwen3", "gemma3"))
    assert hp.has_post_norms == arch.startswith("gemma")
    assert hp.ffn_act == ("gelu_tanh" if arch.startswith("gemma") else "silu")
    assert hp.embd_scale == pytest.approx(math.sqrt(hp.n_embd) if arch.startswith("gemma") else 1)
    factor = cfg.get("rope_scaling_factor")
    assert hp.rope_freq_scale == pytest.approx(1 / factor if factor else 1.0)
    assert hp.rope_scaling_type == (cfg.get("rope_scaling_type") or "none")
    if cfg.get("rope_scaling_orig_ctx"):
        assert hp.rope_scaling_orig_ctx == cfg["rope_scaling_orig_ctx"]
    if arch.startswith("gemma"):
        # llama.cpp's defaults when the file is silent: gemma2 window 4096 / pattern 2 /
        # soft-caps 50 and 30; gemma3 pattern 6 and local rope base 10000, no soft-cap.
        default_swa = 4096 if arch == "gemma2" else 0
        n_swa = default_swa if cfg.get("n_swa") is None else cfg["n_swa"]
        assert hp.n_swa == n_swa
        pat = cfg.get("swa_pattern")
        if isinstance(pat, list):
            want = pat
        else:
            p = (2 if arch == "gemma2" else 6) if pat is None else pat
            want = [p == 0 or il % p < p - 1 for il in range(cfg["n_layer"])]
        assert [hp.is_swa(il) for il in range(hp.n_layer)] == (want if n_swa else [False] * hp.n_layer)
        if arch == "gemma2":
            assert hp.attn_softcap == (50.0 if cfg.get("attn_softcap") is None else cfg["attn_softcap"])
            assert hp.final_softcap == (30.0 if cfg.get("final_softcap") is None
                                        else cfg["final_softcap"])
            assert hp.rope_freq_base_swa == hp.rope_freq_base
        else:
            assert hp.attn_softcap == 0 and hp.final_softcap == (cfg.get("final_softcap") or 0)
            if n_swa:
                assert hp.rope_freq_base_swa == (cfg.get("rope_freq_base_swa") or 10000.0)
    else:
        assert hp.n_swa == 0 and not any(hp.is_swa(il) for il in range(hp.n_layer))
        assert hp.attn_softcap == 0 and hp.final_softcap == 0
    # ...and against llama.cpp loading the same file.
    _check_against_llamacpp(hp, _load_info(path))


# -- bad input -----------------------------------------------------------------------------------
def _raises(path: Path, *words: str, check_hparams: bool = False) -> str:
    with pytest.raises(GGTrainError) as ei:
        mf = ModelFile(path)
        if check_hparams:
            read_hparams(mf)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    assert any(w in msg.lower() for w in words), msg
    return msg


@pytest.fixture(scope="module")
def good() -> tuple[Path, bytes, gguf.GGUFReader]:
    path = tinymodels.tiny_model("llama", "Q8_0")
    return path, path.read_bytes(), _reader(path)


def test_truncated_files(good, tmp_path):
    _path, raw, reader = good
    kv_start = reader.fields["general.architecture"].offset
    tokens_at = reader.fields["tokenizer.ggml.tokens"].offset
    infos_at = reader.tensors[0].field.offset
    data_at = reader.data_offset
    cuts = {
        "empty": 0, "magic": 2, "version": 6, "counts": 20, "first-kv": kv_start + 9,
        "token-list": tokens_at + 5000, "tensor-infos": infos_at + 1, "tensor-info-shape": infos_at + 30,
        "padding": data_at - 4, "data-start": data_at, "data-middle": (data_at + len(raw)) // 2,
        "last-byte": len(raw) - 1,
    }
    for what, cut in cuts.items():
        bad = tmp_path / f"cut-{what}.gguf"
        bad.write_bytes(raw[:cut])
        _raises(bad, "truncated", "not a gguf", "corrupt")


def test_not_gguf(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("this is a text file, not a model\n" * 10)
    assert "not a GGUF" in _raises(text, "not a gguf")
    ggml = tmp_path / "old.bin"  # an old GGML/GGJT file
    ggml.write_bytes(b"tjgg" + bytes(100))
    _raises(ggml, "not a gguf")
    _raises(tmp_path / "missing.gguf", "no such file")
    _raises(tmp_path, "directory")


def test_big_endian(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32).byteswap())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf.GGUFReader(tmp_path / "be.gguf").endianess == gguf.GGUFEndian.BIG
    _raises(tmp_path / "be.gguf", "big-endian")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_wrong_version(good, tmp_path, version):
    _, raw, _ = good
    bad = tmp_path / f"v{version}.gguf"
    bad.write_bytes(raw[:4] + struct.pack("<I", version) + raw[8:])
    assert str(version) in _raises(bad, "version")


def _tensor_offset_pos(raw: bytes, reader: gguf.GGUFReader, name: str) -> int:
    """Byte position of tensor name's u64 offset field in its tensor info."""
    t = next(t for t in reader.tensors if t.name == name)
    pos = t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape) + 4
    assert struct.unpack_from("<Q", raw, pos)[0] == t.data_offset - reader.data_offset
    return pos


def test_misaligned_offset(good, tmp_path):
    _, raw, reader = good
    name = reader.tensors[3].name
    pos = _tensor_offset_pos(raw, reader, name)
    off = struct.unpack_from("<Q", raw, pos)[0]
    bad = tmp_path / "misaligned.gguf"
    bad.write_bytes(raw[:pos] + struct.pack("<Q", off + 4) + raw[pos + 8:])
    msg = _raises(bad, "align")
    assert name in msg


def test_tensor_past_end(good, tmp_path):
    _, raw, reader = good
    name = reader.tensors[-1].name
    pos = _tensor_offset_pos(raw, reader, name)
    bad = tmp_path / "past-end.gguf"
    bad.write_bytes(raw[:pos] + struct.pack("<Q", len(raw) // 32 * 32) + raw[pos + 8:])
    assert name in _raises(bad, "past the end", "truncated")
    huge = tmp_path / "huge-offset.gguf"  # an offset whose sum with the start overflows 64 bits
    huge.write_bytes(raw[:pos] + struct.pack("<Q", 2**64 - 32) + raw[pos + 8:])
    _raises(huge, "past the end", "truncated", "corrupt")


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, QT | None]]) -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", 1)
    for name, (data, qt) in tensors.items():
        if qt is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba",
                       {"token_embd.weight": (np.zeros((8, 32), np.float32), None)})
    msg = _raises(path, "architecture", check_hparams=True)
    assert "mamba" in msg


@pytest.mark.parametrize("qtype", ["IQ2_XXS", "Q8_1", "IQ1_S", "TQ2_0"])
def test_unsupported_tensor_type(tmp_path, qtype):
    qt = QT[qtype]
    block, type_size = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (4, 256 // block * type_size), dtype=np.uint8)
    path = _write_gguf(tmp_path / f"{qtype}.gguf", "llama",
                       {"blk.0.attn_q.weight": (raw, qt),
                        "token_embd.weight": (np.zeros((8, 32), np.float32), None)})
    assert _reader(path).tensors[0].tensor_type == qt  # gguf-py agrees the file is well-formed
    msg = _raises(path, "unsupported tensor type")
    assert qtype in msg and "blk.0.attn_q.weight" in msg


def test_unknown_tensor_type_id(good, tmp_path):
    _, raw, reader = good
    t = reader.tensors[0]
    pos = _tensor_offset_pos(raw, reader, t.name) - 4
    assert struct.unpack_from("<I", raw, pos)[0] == t.tensor_type
    bad = tmp_path / "type99.gguf"
    bad.write_bytes(raw[:pos] + struct.pack("<I", 99) + raw[pos + 4:])
    assert "99" in _raises(bad, "type")
