"""`ggtrain info` as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections import Counter
from pathlib import Path

import gguf
import llamacpp
import numpy as np
import pytest
import tinymodels
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QT


def ggtrain(*args: str | Path) -> subprocess.CompletedProcess:
    exe = shutil.which("ggtrain")
    assert exe, "the ggtrain console script is not installed (pip install -e .)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300,
                          check=False)


def _field(out: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}:\s+(.*)$", out, re.MULTILINE)
    assert m, f"no '{label}:' line in:\n{out}"
    return m.group(1).strip()


def _check_info(out: str, path: Path) -> None:
    """Every figure `ggtrain info` prints, against gguf-py (file contents) and llama.cpp (hparams)."""
    reader = gguf.GGUFReader(path)
    info = llamacpp.load_info(path)
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre"))}
    assert _field(out, "file") == str(path)
    assert _field(out, "architecture") == info["arch"] == meta["general.architecture"]
    assert _field(out, "n_embd") == info["n_embd"]
    assert _field(out, "train context") == info["n_ctx_train"]
    assert _field(out, "n_layer") == info["n_layer"]
    assert _field(out, "n_head") == (f"{info['n_head']} (kv heads {info['n_head_kv']}, "
                                     f"head dim {info['n_embd_head_k']})")
    assert _field(out, "n_ff") == info["n_ff"]
    rope = _field(out, "rope")
    assert rope.startswith("neox" if info["rope type"] == "2" else "normal")
    assert f"base {float(info['freq_base_train']):g}" in rope and f"dims {info['n_rot']}" in rope
    assert float(_field(out, "norm eps")) == pytest.approx(float(info["f_norm_rms_eps"]), rel=0.05)
    swa = _field(out, "sliding window")
    if info["is_swa_any"] == "1":
        n_local = sum(info["is_swa"])
        assert swa.startswith(f"{info['n_swa']} on {n_local} of {info['n_layer']} layers"), swa
    else:
        assert swa == "none"
    tied = "output.weight" not in {t.name for t in reader.tensors}
    assert _field(out, "output head") == ("tied to token_embd" if tied else "separate")
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    assert int(info["n_vocab"]) == n_vocab
    vocab = _field(out, "vocab")
    assert vocab.startswith(f"{n_vocab} tokens, tokenizer '{meta['tokenizer.ggml.model']}'"), vocab
    if "tokenizer.ggml.pre" in meta:
        assert f"pre-tokenizer '{meta['tokenizer.ggml.pre']}'" in vocab
    has_template = "tokenizer.chat_template" in reader.fields
    assert _field(out, "chat template") == ("yes" if has_template else "no")

    # The table: per type, tensor count / elements / bytes as gguf-py counts them.
    counts: Counter = Counter()
    elems: Counter = Counter()
    nbytes: Counter = Counter()
    for t in reader.tensors:
        name = QT(t.tensor_type).name
        counts[name] += 1
        elems[name] += int(t.n_elements)
        nbytes[name] += int(t.n_bytes)
    rows = {m.group(1): tuple(int(x.replace(",", "")) for x in m.group(2, 3, 4))
            for m in re.finditer(r"^(\w+)\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+\S+ \S+$", out, re.MULTILINE)}
    n_params = sum(elems.values())
    assert _field(out, "parameters").startswith(f"{n_params / 1e6:.1f} M in {len(reader.tensors)} tensors")
    assert rows.pop("total") == (len(reader.tensors), sum(elems.values()), sum(nbytes.values()))
    assert rows == {k: (counts[k], elems[k], nbytes[k]) for k in counts}


def test_info_default_model(gemma_path):
    proc = ggtrain("info")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    _check_info(proc.stdout, gemma_path)
    assert _field(proc.stdout, "architecture") == "gemma3"


@pytest.mark.parametrize("arch,qtype", [("qwen2", "Q4_K"), ("llama", "Q8_0"), ("gemma3", "F32")])
def test_info_tiny_model(arch, qtype):
    path = tinymodels.tiny_model(arch, qtype)
    proc = ggtrain("info", path)
    assert proc.returncode == 0, proc.stderr
    _check_info(proc.stdout, path)


def test_info_help():
    proc = ggtrain("info", "--help")
    assert proc.returncode == 0 and "MODEL" in proc.stdout


# -- bad input: one line on stderr naming the file and the problem, exit code 2 -----------------
def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, QT | None]]) -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", 1)
    for name, (data, qt) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bad_files(tmp: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (file, words one of which the message must contain)."""
    src = tinymodels.tiny_model("llama", "Q8_0")
    raw = src.read_bytes()
    reader = gguf.GGUFReader(src)
    t = reader.tensors[2]
    off_pos = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4
    off = struct.unpack_from("<Q", raw, off_pos)[0]
    assert off == t.data_offset - reader.data_offset
    files: dict[str, tuple[bytes | Path, tuple[str, ...]]] = {
        "truncated-header": (raw[:20], ("truncated",)),
        "truncated-metadata": (raw[:reader.fields["tokenizer.ggml.scores"].offset + 100],
                               ("truncated",)),
        "truncated-infos": (raw[:t.field.offset + 10], ("truncated",)),
        "truncated-data": (raw[:len(raw) - 1000], ("truncated",)),
        "not-gguf": (b"PK\x03\x04 this is a zip file, not a model" * 4, ("not a gguf",)),
        "empty": (b"", ("not a gguf", "empty")),
        "version-7": (raw[:4] + struct.pack("<I", 7) + raw[8:], ("version 7",)),
        "misaligned": (raw[:off_pos] + struct.pack("<Q", off + 1) + raw[off_pos + 8:], ("align",)),
        "past-end": (raw[:off_pos] + struct.pack("<Q", len(raw) // 32 * 32) + raw[off_pos + 8:],
                     ("past the end", "truncated")),
    }
    out = {}
    for name, (data, words) in files.items():
        p = tmp / f"{name}.gguf"
        p.write_bytes(data)
        out[name] = (p, words)
    embd = (np.zeros((8, 32), np.float32), None)
    out["arch-mamba"] = (_write_gguf(tmp / "mamba.gguf", "mamba", {"token_embd.weight": embd}),
                         ("unsupported architecture 'mamba'",))
    for qtype in ("IQ2_XXS", "Q8_1"):
        qt = QT[qtype]
        block, size = GGML_QUANT_SIZES[qt]
        data = np.random.default_rng(0).integers(0, 256, (4, 256 // block * size), dtype=np.uint8)
        out[f"type-{qtype}"] = (_write_gguf(tmp / f"{qtype}.gguf", "llama",
                                            {"blk.0.attn_q.weight": (data, qt), "token_embd.weight": embd}),
                                (f"unsupported tensor type {qtype}",))
    out["missing"] = (tmp / "no-such-model.gguf", ("no such file",))
    out["directory"] = (tmp, ("directory",))
    return out


BAD = ("truncated-header", "truncated-metadata", "truncated-infos", "truncated-data", "not-gguf",
       "empty", "version-7", "misaligned", "past-end", "arch-mamba", "type-IQ2_XXS", "type-Q8_1",
       "missing", "directory")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", BAD)
def test_info_bad_input(bad_files, name):
    path, words = bad_files[name]
    proc = ggtrain("info", path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("ggtrain: error: ") and str(path) in line, line
    assert any(w in line.lower() for w in (w.lower() for w in words)), line


def test_bad_inputs_cover_the_list(bad_files):
    assert set(bad_files) == set(BAD)
