"""`ggtrain merge` as a user runs it: llama.cpp runs the merged model as it runs base + adapter.

- llama-perplexity of the f16 merge within 0.5% of llama-perplexity with base + adapter at the same
  scale, of the `same` merge within 1%, whose file stays within 2% of the base's size; on tiny models
  of three architectures (f16 on Q4_K bases, `same` on Q8_0 ones) and on the real Gemma 3 270M
  Q4_K_M (`same`: Q5_0, Q8_0, Q4_K and Q6_K tensors). Every adapter moves the perplexity by more than
  the tolerance, so a merge that dropped it would fail.
- K-quant `same` blocks are llama-quantize's own re-quantization of W + ΔW (or the base's block where
  that is closer); the f16 merge is llama-export-lora's to within one f16 rounding.
- Untouched tensors byte-identical to the base's; every metadata key of the base present with the
  same value and GGUF type; general.file_type and general.base_model.* as documented.
- Refusals in a subprocess: exit 2, one line naming the files, no traceback; a failed write leaves
  the previous output whole.
On random-weight tiny models a 4-bit grid's rounding alone moves perplexity by 2-3% (no redundancy
in the weights), so `same` is measured against 1% on Q8_0 tiny bases and on the real model.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import gguf
import llamacpp
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QT
from loras import TEXT, ggtrain, ok, random_adapter, refused
from tinymodels import tiny_model

from ggtrain import kernels
from ggtrain.adapters.gguf_lora import read_gguf_adapter, write_gguf_adapter
from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraWeights

ALL = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# arch -> (B's std, targets): strong enough to move these random models' perplexity by > 1%
ARCHS = {"llama": (0.05, ALL + ("output",)), "qwen2": (0.5, ALL), "gemma3": (0.2, ALL)}
SCALE = 0.7


def ppl(model: Path, lora: tuple = ()) -> float:
    return llamacpp.perplexity(model, TEXT, ctx=128, chunks=4, lora=lora)[0]


def deq(mf: ModelFile, name: str) -> np.ndarray:
    t = mf.tensors[name]
    return kernels.dequantize(t.data, t.qtype).reshape(t.shape)


def assert_rest_kept(base: Path, out: Path, merged: set[str]) -> tuple[ModelFile, ModelFile]:
    """Untouched tensors byte for byte, in the base's order; every base key with its value and type."""
    b, m = ModelFile(base, check_types=False), ModelFile(out, check_types=False)
    assert list(m.tensors) == list(b.tensors)
    for name, t in b.tensors.items():
        if name not in merged:
            assert m.tensors[name].qtype == t.qtype and np.array_equal(m.tensors[name].data, t.data), name
    for key, value in b.metadata.items():
        if key == "general.file_type" or key.startswith("general.base_model."):
            continue
        assert key in m.metadata, key
        assert m.value_types[key] == b.value_types[key], key
        assert np.array_equal(np.asarray(m.metadata[key]), np.asarray(value)), key
    return b, m


def merged_names(adapter: Path, base: Path) -> set[str]:
    lw, _, _ = read_gguf_adapter(adapter, ModelFile(base), warn=None)
    return set(lw.names)


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_merge_runs_like_base_plus_adapter(arch: str, tmp_path: Path) -> None:
    base = tiny_model(arch, "Q4_K")
    b_std, targets = ARCHS[arch]
    adapter = random_adapter(base, tmp_path / "a.gguf", targets=targets, r=8, alpha=16, b_std=b_std)
    out = tmp_path / "merged.gguf"
    r = ok(ggtrain("merge", "-m", base, "--lora", f"{adapter}:{SCALE}", "-o", out))
    p_base, p_lora, p_merged = ppl(base), ppl(base, [(adapter, SCALE)]), ppl(out)
    print(f"{arch} f16: base {p_base:.1f}, base + adapter {p_lora:.1f}, merged {p_merged:.1f}")
    assert abs(p_lora / p_base - 1) > 0.01
    assert p_merged == pytest.approx(p_lora, rel=0.005)
    names = merged_names(adapter, base)
    b, m = assert_rest_kept(base, out, names)
    assert {m.tensors[n].type_name for n in names} == {"F16"}
    assert m.get("general.file_type") == gguf.LlamaFileType.MOSTLY_F16 != b.get("general.file_type")
    assert [m.get(f"general.base_model.{i}.name") for i in range(m.get("general.base_model.count"))] == \
        [b.get("general.name"), f"{b.get('general.name')} LoRA"]
    assert m.get("ggtrain.adapters.merge.adapters") == ["a.gguf"] and m.get("ggtrain.adapters.merge.scales").tolist() == [
        pytest.approx(SCALE)]
    n = len(names)
    assert f"merged:  {n} tensors ({n} F16); {len(b.tensors) - n} copied" in r.stdout


@pytest.mark.parametrize("arch", ARCHS)
def test_same_merge_keeps_the_size_and_runs_like_base_plus_adapter(arch: str, tmp_path: Path) -> None:
    base = tiny_model(arch, "Q8_0")
    b_std, targets = ARCHS[arch]
    adapter = random_adapter(base, tmp_path / "a.gguf", targets=targets, r=8, alpha=16, b_std=b_std)
    out = tmp_path / "merged.gguf"
    ok(ggtrain("merge", "-m", base, "--lora", f"{adapter}:{SCALE}", "-o", out, "--outtype", "same"))
    p_base, p_lora, p_merged = ppl(base), ppl(base, [(adapter, SCALE)]), ppl(out)
    print(f"{arch} same: base {p_base:.1f}, base + adapter {p_lora:.1f}, merged {p_merged:.1f}")
    assert abs(p_lora / p_base - 1) > 0.01
    assert p_merged == pytest.approx(p_lora, rel=0.01)
    assert out.stat().st_size == pytest.approx(base.stat().st_size, rel=0.02)
    names = merged_names(adapter, base)
    b, m = assert_rest_kept(base, out, names)
    assert all(m.tensors[n].qtype == b.tensors[n].qtype for n in names)
    assert m.get("general.file_type") == b.get("general.file_type")


def _block_err(w: np.ndarray, target: np.ndarray, block: int) -> np.ndarray:
    d = (w.astype(np.float64) - target).reshape(w.shape[0], -1, block)
    return (d * d).sum(-1)


def test_same_k_quant_blocks_are_llama_quantizes_or_the_bases(tmp_path: Path) -> None:
    """Each merged Q4_K block is what llama-quantize makes of W + ΔW (from our f32 merge), or the
    base's own block where that is at least as close to W + ΔW; the f32 merge is W + ΔW exactly."""
    base = tiny_model("llama", "Q4_K")
    a1 = random_adapter(base, tmp_path / "a1.gguf", targets=ALL + ("output",), b_std=0.05, seed=1)
    a2 = random_adapter(base, tmp_path / "a2.gguf", targets=("attn_q", "ffn_up"), r=2, b_std=0.1, seed=2)
    loras = [f"{a1}:0.5", f"{a2}:-1.5"]
    f32, same = tmp_path / "f32.gguf", tmp_path / "same.gguf"
    for out, outtype in ((f32, "f32"), (same, "same")):
        ok(ggtrain("merge", "-m", base, "--lora", loras[0], "--lora", loras[1], "-o", out,
                   "--outtype", outtype))
    ref = tmp_path / "llama-quantize.gguf"
    llamacpp.run("llama-quantize", "--pure", "--allow-requantize", f32, ref, "Q4_K_M", "2", timeout=900)
    b, m32, ms, mr = (ModelFile(p, check_types=False) for p in (base, f32, same, ref))
    lws = [read_gguf_adapter(a, b, scale=s, warn=None)[0] for a, s in ((a1, 0.5), (a2, -1.5))]
    block, size = GGML_QUANT_SIZES[QT.Q4_K]
    counts = {"llama-quantize": 0, "base": 0}
    for name in sorted({n for lw in lws for n in lw.names}):
        target = deq(b, name).astype(np.float64)
        for lw in lws:  # in the merge's order: float64 sums round differently in another
            if name in lw:
                target += lw.delta(name)
        assert np.array_equal(m32.tensors[name].data.view(np.float32).reshape(target.shape),
                              target.astype(np.float32)), name
        assert mr.tensors[name].qtype == ms.tensors[name].qtype == QT.Q4_K, name
        rows = target.shape[0]
        ours, theirs, orig = (x.tensors[name].data.reshape(rows, -1, size) for x in (ms, mr, b))
        is_ref = (ours == theirs).all(-1)
        is_base = (ours == orig).all(-1)
        assert (is_ref | is_base).all(), name
        err_ref = _block_err(deq(mr, name), target, block)
        err_base = _block_err(deq(b, name), target, block)
        assert (err_base[is_base & ~is_ref] <= err_ref[is_base & ~is_ref]).all(), name
        assert (err_base[~is_base] > err_ref[~is_base]).all(), name
        counts["llama-quantize"] += int((is_ref & ~is_base).sum())
        counts["base"] += int((is_base & ~is_ref).sum())
    print("blocks taken from:", counts)
    assert counts["llama-quantize"] > 0 and counts["base"] > 0


def test_two_adapters_one_negative_add_up(tmp_path: Path) -> None:
    base = tiny_model("llama", "Q4_K")
    a1 = random_adapter(base, tmp_path / "one.gguf", targets=ALL, b_std=0.05, seed=1)
    a2 = random_adapter(base, tmp_path / "two.gguf", targets=("attn_v", "ffn_down", "output"), r=4,
                        b_std=0.08, seed=2)
    out = tmp_path / "merged.gguf"
    ok(ggtrain("merge", "-m", base, "--lora", f"{a1}:0.5", "--lora", f"{a2}:-0.8", "-o", out))
    p_base, p_lora, p_merged = ppl(base), ppl(base, [(a1, 0.5), (a2, -0.8)]), ppl(out)
    print(f"two adapters: base {p_base:.1f}, base + adapters {p_lora:.1f}, merged {p_merged:.1f}")
    assert abs(p_lora / p_base - 1) > 0.01
    assert p_merged == pytest.approx(p_lora, rel=0.005)
    m = ModelFile(out)
    assert m.get("general.base_model.count") == 3
    assert m.get("ggtrain.adapters.merge.adapters") == ["one.gguf", "two.gguf"]
    assert m.get("ggtrain.adapters.merge.scales").tolist() == [0.5, pytest.approx(-0.8)]


def test_f16_merge_is_llama_export_loras(tmp_path: Path) -> None:
    base = tiny_model("llama", "Q8_0")
    adapter = random_adapter(base, tmp_path / "a.gguf", targets=ALL + ("output",), b_std=0.05)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    ok(ggtrain("merge", "-m", base, "--lora", f"{adapter}:{SCALE}", "-o", ours))
    llamacpp.run("llama-export-lora", "-m", base, "--lora-scaled", f"{adapter}:{SCALE}", "-o", theirs,
                 "-t", "2")
    mo, mt = ModelFile(ours), ModelFile(theirs)
    assert set(mo.tensors) == set(mt.tensors)  # llama-export-lora writes them in name order
    names = merged_names(adapter, base)
    for name, t in mt.tensors.items():
        assert mo.tensors[name].qtype == t.qtype, name
        if name not in names:
            assert np.array_equal(mo.tensors[name].data, t.data), name
            continue
        a, b = deq(mo, name), deq(mt, name)  # F16: at most one rounding step apart
        ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
        assert (np.abs(a - b) <= ulp).all(), (name, float(np.abs(a - b).max()))
    assert mo.get("general.file_type") == mt.get("general.file_type") == gguf.LlamaFileType.MOSTLY_F16


def test_metadata_types_as_gguf_py_reads_them(tmp_path: Path) -> None:
    """An independent reader (gguf-py) sees every key of the base with the same types and values."""
    base = tiny_model("gemma3", "Q8_0")
    adapter = random_adapter(base, tmp_path / "a.gguf")
    out = tmp_path / "merged.gguf"
    ok(ggtrain("merge", "-m", base, "--lora", adapter, "-o", out, "--outtype", "q8_0"))
    rb, rm = gguf.GGUFReader(base), gguf.GGUFReader(out)
    for key, f in rb.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        g = rm.fields[key]
        assert g.types == f.types, key
        assert g.contents() == f.contents(), key
    assert rm.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_gemma_same_merge(gemma_path: Path, tmp_path: Path) -> None:
    adapter = random_adapter(gemma_path, tmp_path / "g.gguf", targets=ALL, r=8, alpha=16, b_std=0.01)
    out = tmp_path / "gemma-merged.gguf"
    r = ok(ggtrain("merge", "-m", gemma_path, "--lora", adapter, "-o", out, "--outtype", "same"))
    p_base, p_lora, p_merged = ppl(gemma_path), ppl(gemma_path, [(adapter, 1.0)]), ppl(out)
    print(f"gemma same: base {p_base:.3f}, base + adapter {p_lora:.3f}, merged {p_merged:.3f}")
    assert abs(p_lora / p_base - 1) > 0.01
    assert p_merged == pytest.approx(p_lora, rel=0.01)
    assert out.stat().st_size == pytest.approx(gemma_path.stat().st_size, rel=0.02)
    names = merged_names(adapter, gemma_path)
    b, m = assert_rest_kept(gemma_path, out, names)
    assert {b.tensors[n].type_name for n in names} >= {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert all(m.tensors[n].qtype == b.tensors[n].qtype for n in names)
    assert m.get("general.file_type") == b.get("general.file_type")
    # streamed: the process grew far less than the 671 MB token_embd would take at f32, or the file
    mem = re.search(r"^memory: +peak RSS (\S+ \S+), (\S+) (\S+) more than at the start \(the largest merged "
                    r"tensor is (\S+) (\S+) at f32\)$", r.stdout, re.MULTILINE)
    assert mem, r.stdout
    grew = float(mem[2]) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[mem[3]]
    assert grew < 150 * 2**20, r.stdout


def _handmade_adapter(path: Path, arch: str, pairs: dict[str, tuple[int, int]], r: int = 2) -> Path:
    """An adapter with the given 'NAME.weight' -> (out, in) pairs, as another tool could write it."""
    w = gguf.GGUFWriter(path, arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 2.0)
    rng = np.random.default_rng(0)
    for name, (n_out, n_in) in pairs.items():
        w.add_tensor(f"{name}.lora_a", rng.standard_normal((r, n_in)).astype(np.float32))
        w.add_tensor(f"{name}.lora_b", rng.standard_normal((n_out, r)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_refusals_name_the_files(tmp_path: Path) -> None:
    base = tiny_model("llama", "Q8_0")
    tied = tiny_model("qwen2", "Q8_0")
    adapter = random_adapter(base, tmp_path / "a.gguf")
    err = refused(ggtrain("merge", "-m", base, "--lora", adapter, "-o", base))
    assert f"{base}: is one of the inputs" in err
    (tmp_path / "d").mkdir()
    assert "d" in refused(ggtrain("merge", "-m", base, "--lora", adapter, "-o", tmp_path / "d"))
    err = refused(ggtrain("merge", "-m", base, "--lora", adapter, "-o", tmp_path / "no" / "x.gguf"))
    assert f"{tmp_path / 'no' / 'x.gguf'}: there is no directory {tmp_path / 'no'}" in err
    qm = ModelFile(tied)
    embd_shape = qm.tensors["token_embd.weight"].shape
    head = _handmade_adapter(tmp_path / "head.gguf", "qwen2", {"output.weight": embd_shape})
    err = refused(ggtrain("merge", "-m", tied, "--lora", head, "-o", tmp_path / "x.gguf"))
    assert str(head) in err and str(tied) in err and "'output.weight'" in err
    embd = _handmade_adapter(tmp_path / "embd.gguf", "qwen2", {"token_embd.weight": embd_shape[::-1]})
    err = refused(ggtrain("merge", "-m", tied, "--lora", embd, "-o", tmp_path / "x.gguf"))
    assert str(embd) in err and "token_embd" in err
    assert "--outtype" in refused(ggtrain("merge", "-m", base, "--lora", adapter, "-o", tmp_path / "x.gguf",
                                          "--outtype", "q4_k"))
    assert not (tmp_path / "x.gguf").exists()


def test_a_failed_write_leaves_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ggtrain.adapters import merge as merge_module

    base = tiny_model("llama", "Q8_0")
    adapter = random_adapter(base, tmp_path / "a.gguf")
    out = tmp_path / "merged.gguf"
    out.write_bytes(b"the previous merge")

    def disk_full(*args: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")
        yield  # a generator, like the one it stands in for

    monkeypatch.setattr(merge_module, "_merged_rows", disk_full)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(GGTrainError, match=r"merged\.gguf: could not write: no space left on device "
                                           r"\(the previous merged\.gguf is intact\)"):
        merge_module.merge(base, [(adapter, 1.0)], out, "same", progress=False, echo=lambda m: None)
    assert out.read_bytes() == b"the previous merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp file left behind


def test_every_metadata_value_type_is_copied(tmp_path: Path) -> None:
    """Scalars of every GGUF type, arrays of several, and an empty array (which gguf-py's writer
    refuses to write, but GGUF allows): gguf-py reads them back from the merge as from the base."""
    from ggtrain.adapters.merge import _Writer

    VT = gguf.GGUFValueType
    rng = np.random.default_rng(0)
    base = tmp_path / "odd.gguf"
    w = _Writer(base, "llama")
    w.add_name("odd base")
    for i, vt in enumerate((VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)):
        w.add_key_value(f"odd.int{i}", 7, vt)
    w.add_key_value("odd.f64", 1 / 3, VT.FLOAT64)
    w.add_key_value("odd.f32", 0.1, VT.FLOAT32)
    w.add_key_value("odd.bool", True, VT.BOOL)
    w.add_key_value("odd.bools", [True, False, True], VT.ARRAY, sub_type=VT.BOOL)
    w.add_key_value("odd.u64s", [1, 2**40], VT.ARRAY, sub_type=VT.UINT64)
    w.add_key_value("odd.f64s", [0.5, 1e300], VT.ARRAY, sub_type=VT.FLOAT64)
    w.add_key_value("odd.empty", [], VT.ARRAY, sub_type=VT.UINT32)
    w.add_key_value("odd.strings", ["a", "", "ü"], VT.ARRAY, sub_type=VT.STRING)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf.GGUFReader(base).fields["odd.empty"].contents() == []  # well-formed, as gguf-py reads it
    assert ModelFile(base).value_types["odd.empty"] == (VT.ARRAY, VT.UINT32)
    lw = LoraWeights({"blk.0.attn_q.weight": (32, 32, 2, 2.0, 0.0)})
    lw.flat[...] = rng.standard_normal(lw.flat.shape).astype(np.float32)
    adapter = write_gguf_adapter(tmp_path / "a.gguf", lw, ModelFile(base))
    out = tmp_path / "merged.gguf"
    ok(ggtrain("merge", "-m", base, "--lora", adapter, "-o", out))
    rb, rm = gguf.GGUFReader(base).fields, gguf.GGUFReader(out).fields
    mb, mm = ModelFile(base), ModelFile(out)
    for key in (k for k in rb if k.startswith("odd.")):
        assert rm[key].types == rb[key].types and mm.value_types[key] == mb.value_types[key], key
        assert rm[key].contents() == rb[key].contents(), key
