"""ggtrain.adapters.gguf_lora: llama.cpp GGUF LoRA adapters — format read back independently with gguf-py,
round trips, clear errors, atomic writes, and llama.cpp itself applying what we write exactly like
a model whose weights we merged in float64."""

import errno
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QT

from ggtrain.adapters.gguf_lora import parse_lora_arg, read_gguf_adapter, write_gguf_adapter
from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp
import tinymodels
from loras import random_lora, write_base

TEXT = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture
def base(tmp_path):
    return write_base(tmp_path / "base.gguf")


def test_format_as_gguf_py_reads_it(tmp_path, base):
    cfg = LoraConfig.make(r=4, alpha=8, ranks={"ffn_down": 2, "output": 3})
    lw = random_lora(base, cfg, 2)
    p = write_gguf_adapter(tmp_path / "a.gguf", lw, base)
    r = gguf.GGUFReader(p)
    f = r.fields
    assert f["general.type"].contents() == "adapter"
    assert f["adapter.type"].contents() == "lora"
    assert f["general.architecture"].contents() == "llama"
    assert f["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert f["adapter.lora.alpha"].contents() == 8.0
    assert f["general.name"].contents() == "tiny base LoRA"
    assert f["general.base_model.0.name"].contents() == "tiny base"
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * len(lw)
    for name, e in lw.entries.items():
        ta, tb = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        o, i = base.tensors[name].shape
        assert list(ta.shape) == [i, e.rank] and list(tb.shape) == [e.rank, o]  # ggml ne order
        assert ta.tensor_type == QT.F32 and tb.tensor_type == QT.F32
        np.testing.assert_array_equal(np.asarray(ta.data).reshape(e.A.shape), e.A)
        np.testing.assert_array_equal(np.asarray(tb.data).reshape(e.B.shape), e.B)
    assert tensors["output.weight.lora_b"].shape.tolist() == [3, 50]


def test_round_trip_exact_f32(tmp_path, base):
    cfg = LoraConfig.make(r=4, alpha=16, ranks={"attn_v": 1})
    lw = random_lora(base, cfg, 2)
    p = write_gguf_adapter(tmp_path / "a.gguf", lw, base, extra_meta={"training.steps": 30, "x.y": "z"})
    back, alpha, meta = read_gguf_adapter(p, base)
    assert alpha == 16.0 and meta["training.steps"] == 30 and meta["x.y"] == "z"
    assert back.names == lw.names
    np.testing.assert_array_equal(back.flat, lw.flat)
    for name, e in lw.entries.items():
        assert back[name].scale == e.scale
    # --lora-scaled F:0.5 halves every scale
    half, _, _ = read_gguf_adapter(p, base, scale=0.5)
    for name in lw.names:
        np.testing.assert_allclose(half.delta(name), 0.5 * lw.delta(name), rtol=1e-12)


def test_per_target_alpha_is_folded_into_b(tmp_path, base):
    cfg = LoraConfig.make(r=4, alpha=8, alphas={"attn_q": 2.0, "ffn_up": 32.0}, ranks={"ffn_up": 8})
    lw = random_lora(base, cfg, 2)
    p = write_gguf_adapter(tmp_path / "a.gguf", lw, base, alpha=8.0)
    back, alpha, meta = read_gguf_adapter(p, base)
    assert alpha == 8.0 and "folded" in meta["ggtrain.adapter.note"]
    for name in lw.names:  # what llama.cpp applies equals what we trained
        np.testing.assert_allclose(back.delta(name), lw.delta(name), rtol=1e-6, atol=1e-9)


def test_f16_and_q8_0(tmp_path, base):
    cfg = LoraConfig.make(r=32, targets=["attn_q", "ffn_down"], ranks={"ffn_down": 4})
    lw = random_lora(base, cfg, 2)
    for dtype, rtol in (("f16", 2e-3), ("q8_0", 2e-2)):
        p = write_gguf_adapter(tmp_path / f"{dtype}.gguf", lw, base, dtype=dtype)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(p).tensors}
        if dtype == "q8_0":
            assert types["blk.0.attn_q.weight.lora_a"] == QT.Q8_0  # rows of 64
            assert types["blk.0.attn_q.weight.lora_b"] == QT.Q8_0  # rows of r = 32
            assert types["blk.0.ffn_down.weight.lora_b"] == QT.F16  # rows of 4: no Q8_0 block fits
        else:
            assert set(types.values()) == {QT.F16}
        back, _, _ = read_gguf_adapter(p, base)
        for name in lw.names:
            d = lw.delta(name)
            assert np.abs(back.delta(name) - d).max() <= rtol * np.abs(d).max()
    with pytest.raises(GGTrainError, match="q4_0"):
        write_gguf_adapter(tmp_path / "x.gguf", lw, base, dtype="q4_0")


def test_reader_errors_name_file_and_tensor(tmp_path, base):
    cfg = LoraConfig.make(r=4)
    lw = random_lora(base, cfg, 2)
    p = write_gguf_adapter(tmp_path / "a.gguf", lw, base)

    with pytest.raises(GGTrainError, match=r"base\.gguf: not a LoRA adapter \(a model"):
        read_gguf_adapter(base.path, None)

    other_arch = write_base(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(GGTrainError, match=r"a\.gguf: adapter is for architecture 'llama', the base "
                                           r"model .*qwen\.gguf is 'qwen2'"):
        read_gguf_adapter(p, other_arch)

    one_layer = write_base(tmp_path / "one.gguf", n_layer=1)
    with pytest.raises(GGTrainError, match=r"a\.gguf: LoRA tensor 'blk\.1\.attn_q\.weight' does not exist "
                                           r"in the base model .*one\.gguf"):
        read_gguf_adapter(p, one_layer)

    wider = write_base(tmp_path / "wide.gguf", d=128)
    with pytest.raises(GGTrainError, match=r"a\.gguf: LoRA of 'blk\.0\.attn_q\.weight' is \(64, 64\), "
                                           r"the base model .*wide\.gguf has \(128, 128\)"):
        read_gguf_adapter(p, wider)

    data = p.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGTrainError, match=r"cut\.gguf: truncated"):
        read_gguf_adapter(cut, base)
    cut.write_bytes(data[:100])
    with pytest.raises(GGTrainError, match=r"cut\.gguf"):
        read_gguf_adapter(cut, base)

    def handmade(name, tensors, **kv):
        w = gguf.GGUFWriter(tmp_path / name, "llama")
        w.add_type(kv.get("gtype", "adapter"))
        w.add_string("adapter.type", kv.get("atype", "lora"))
        w.add_float32("adapter.lora.alpha", 4.0)
        for n, a in tensors.items():
            w.add_tensor(n, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    a = np.zeros((4, 64), np.float32)
    b = np.zeros((64, 4), np.float32)
    with pytest.raises(GGTrainError, match=r"pair for 'blk\.0\.attn_q\.weight' is missing its lora_b"):
        read_gguf_adapter(handmade("h1.gguf", {"blk.0.attn_q.weight.lora_a": a}))
    with pytest.raises(GGTrainError, match=r"h2\.gguf: tensor 'blk\.0\.attn_q\.weight' is neither"):
        read_gguf_adapter(handmade("h2.gguf", {"blk.0.attn_q.weight": b}))
    with pytest.raises(GGTrainError, match=r"h3\.gguf: adapter.type is 'control_vector'"):
        read_gguf_adapter(handmade("h3.gguf", {"blk.0.attn_q.weight.lora_a": a}, atype="control_vector"))
    with pytest.raises(GGTrainError, match=r"h4\.gguf: .*token_embd"):
        read_gguf_adapter(handmade("h4.gguf", {"token_embd.weight.lora_a": a, "token_embd.weight.lora_b": b}))
    with pytest.raises(GGTrainError, match=r"h5\.gguf: .*lora_a \(4, 64\) and lora_b \(64, 3\)"):
        read_gguf_adapter(handmade("h5.gguf", {"blk.0.attn_q.weight.lora_a": a,
                                               "blk.0.attn_q.weight.lora_b": b[:, :3].copy()}))
    # norm tensors (mergekit-extract-lora) are skipped, as llama.cpp skips them
    lw2, _, meta = read_gguf_adapter(handmade("h6.gguf", {"blk.0.attn_q.weight.lora_a": a,
                                                          "blk.0.attn_q.weight.lora_b": b,
                                                          "blk.0.attn_norm.weight": np.ones(64, np.float32)}))
    assert lw2.names == ["blk.0.attn_q.weight"] and meta["ggtrain.ignored_tensors"] == ["blk.0.attn_norm.weight"]


def test_writer_checks_base_and_is_atomic(tmp_path, base, monkeypatch):
    cfg = LoraConfig.make(r=4)
    lw = random_lora(base, cfg, 2)
    one_layer = write_base(tmp_path / "one.gguf", n_layer=1)
    with pytest.raises(GGTrainError, match=r"'blk\.1\.attn_q\.weight' does not exist in the base model"):
        write_gguf_adapter(tmp_path / "x.gguf", lw, one_layer)
    assert not (tmp_path / "x.gguf").exists()

    p = write_gguf_adapter(tmp_path / "a.gguf", lw, base)
    before = p.read_bytes()

    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    lw.flat[:] = 0.5
    with pytest.raises(GGTrainError, match=r"a\.gguf: could not write: no space left on device"):
        write_gguf_adapter(p, lw, base)
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")] == []


def test_parse_lora_arg():
    assert parse_lora_arg("a.gguf") == (Path("a.gguf"), 1.0)
    assert parse_lora_arg("dir/a.gguf:0.5") == (Path("dir/a.gguf"), 0.5)
    assert parse_lora_arg("a.gguf:-2") == (Path("a.gguf"), -2.0)
    assert parse_lora_arg("c:/x/a.gguf") == (Path("c:/x/a.gguf"), 1.0)


# -- llama.cpp applies our adapters --------------------------------------------------------------
def write_merged(src: Path, dst: Path, deltas: dict[str, np.ndarray]) -> Path:
    """Copy an F32 GGUF, replacing W by float32(W + delta) (delta float64) for the named tensors."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        val = field.contents()
        if sub is not None and sub != gguf.GGUFValueType.STRING:
            val = list(val)
        w.add_key_value(key, val, vtype, sub_type=sub)
    for t in r.tensors:
        assert t.tensor_type == QT.F32
        arr = np.asarray(t.data).reshape(tuple(reversed([int(x) for x in t.shape])))
        if t.name in deltas:
            arr = (arr.astype(np.float64) + deltas[t.name]).astype(np.float32)
        w.add_tensor(t.name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tinymodels.write_tiny_model(tmp_path_factory.mktemp("m") / "llama.gguf", "llama", "F32")


LOST_LOG_RETRIES = 8


def ppl(model, lora=(), extra=()):
    # llama.cpp's logger is an async thread that is never joined at exit (common_log_main leaks it,
    # see common/log.cpp), so under CPU load the last lines -- "[4]" and "Final estimate" -- are
    # sometimes lost though the run succeeded (1 run in 4 here). The result is deterministic: run again.
    for attempt in range(LOST_LOG_RETRIES):
        try:
            return llamacpp.perplexity(model, TEXT, ctx=128, chunks=4, lora=lora, extra=list(extra))[0]
        except ValueError as e:
            if "Final estimate" not in str(e) or attempt == LOST_LOG_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def test_llamacpp_applies_adapter_like_a_float64_merge(tmp_path, tiny_llama):
    base = ModelFile(tiny_llama)
    n_layer = int(base.metadata["llama.block_count"])
    # every target incl. the output head, different ranks and alphas (alpha folding, per-tensor r)
    cfg = LoraConfig.make(r=4, alpha=8, targets=[*LoraConfig.make().targets, "output"],
                          ranks={"attn_k": 2, "ffn_down": 8, "output": 2}, alphas={"ffn_up": 3.0})
    lw = random_lora(base, cfg, n_layer, seed=7, b_std=0.3)
    adapter = write_gguf_adapter(tmp_path / "adapter.gguf", lw, base, alpha=8.0)
    merged = write_merged(tiny_llama, tmp_path / "merged.gguf", {n: lw.delta(n) for n in lw.names})
    merged_half = write_merged(tiny_llama, tmp_path / "merged_half.gguf",
                               {n: 0.5 * lw.delta(n) for n in lw.names})

    p_base = ppl(tiny_llama)
    p_lora = ppl(tiny_llama, lora=[adapter])
    p_merged = ppl(merged)
    assert abs(p_lora / p_base - 1) > 0.01, (p_base, p_lora)  # the adapter really changes the model
    assert p_lora == pytest.approx(p_merged, rel=1e-4), (p_base, p_lora, p_merged)

    p_lora_half = ppl(tiny_llama, extra=["--lora-scaled", f"{adapter}:0.5"])
    p_merged_half = ppl(merged_half)
    assert abs(p_lora_half / p_lora - 1) > 0.005
    assert p_lora_half == pytest.approx(p_merged_half, rel=1e-4), (p_lora_half, p_merged_half)


def test_llamacpp_refuses_other_architecture_and_we_say_why_first(tmp_path, tiny_llama):
    # a gemma3 model with the llama model's projection shapes: only the architecture differs
    other = ModelFile(tinymodels.write_tiny_model(tmp_path / "g3.gguf", "gemma3", "F32"))
    llama = ModelFile(tiny_llama)
    cfg = LoraConfig.make(r=4, targets=["attn_q", "ffn_up"])
    shapes = target_shapes(other.tensors, cfg, 2)
    assert shapes == target_shapes(llama.tensors, cfg, 2)
    adapter = write_gguf_adapter(tmp_path / "g3-adapter.gguf", random_lora(other, cfg, 2), other)
    with pytest.raises(GGTrainError, match=r"g3-adapter\.gguf: adapter is for architecture 'gemma3'.*'llama'"):
        read_gguf_adapter(adapter, llama)
    outputs = []
    for _ in range(LOST_LOG_RETRIES):  # every run must fail; its message is lost in ~40% of runs (see ppl)
        proc = llamacpp.run("llama-perplexity", "-m", tiny_llama, "-f", TEXT, "-c", "128", "--chunks", "1",
                            "--lora", adapter, check=False)
        assert proc.returncode != 0
        outputs.append(proc.stdout + proc.stderr)
        if outputs[-1].strip():
            break
    assert "model arch and LoRA arch mismatch" in outputs[-1], outputs


def test_llamacpp_export_lora_merges_to_our_float64_merge(tmp_path, tiny_llama):
    """llama-export-lora (llama.cpp's own merge) gives W + scale·B·A for every tensor we adapted."""
    base = ModelFile(tiny_llama)
    cfg = LoraConfig.make(r=4, alpha=8, targets=["attn_q", "attn_v", "ffn_down", "output"],
                          ranks={"ffn_down": 16}, alphas={"attn_v": 1.0})
    lw = random_lora(base, cfg, 2, seed=11, b_std=0.3)
    adapter = write_gguf_adapter(tmp_path / "adapter.gguf", lw, base, alpha=8.0)
    out = tmp_path / "exported.gguf"
    llamacpp.run("llama-export-lora", "-m", tiny_llama, "--lora-scaled", f"{adapter}:0.5", "-o", out)
    merged = ModelFile(out)
    for name, t in base.tensors.items():
        w = t.data.view(np.float32).reshape(t.shape).astype(np.float64)
        got = merged.tensors[name].data.view(np.float32).reshape(t.shape)
        if name in lw:
            want = w + 0.5 * lw.delta(name)
            assert np.abs(got - want).max() < 1e-5 * max(1.0, np.abs(want).max()), name
            assert np.abs(got - w).max() > 1e-3, name  # the merge changed it
        else:
            np.testing.assert_array_equal(got, w.astype(np.float32))


def test_llamacpp_loads_our_adapter_on_the_real_gemma3(tmp_path):
    """The default model (Gemma 3 270M Q4_K_M): llama.cpp takes our adapter on all 7 projections; a
    fresh one (B = 0, as training starts) leaves the perplexity exactly as it is, a trained-looking
    one changes it."""
    from ggtrain.gguf.defaults import default_model_path

    model = default_model_path()
    base = ModelFile(model)
    n_layer = int(base.metadata["gemma3.block_count"])
    cfg = LoraConfig.make(r=8, alpha=16)
    shapes = target_shapes(base.tensors, cfg, n_layer, source=str(model))
    fresh = write_gguf_adapter(tmp_path / "fresh.gguf", LoraWeights.init(cfg, shapes, seed=0), base)
    trained = write_gguf_adapter(tmp_path / "trained.gguf", random_lora(base, cfg, n_layer, b_std=0.02), base)
    back, _, _ = read_gguf_adapter(trained, base)
    assert len(back) == 7 * n_layer

    def gemma_ppl(lora=()):
        for attempt in range(LOST_LOG_RETRIES):
            try:
                return llamacpp.perplexity(model, TEXT, ctx=128, chunks=1, lora=lora)[0]
            except ValueError as e:
                if "Final estimate" not in str(e) or attempt == LOST_LOG_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    p_base = gemma_ppl()
    assert gemma_ppl([fresh]) == pytest.approx(p_base, rel=1e-6)
    p_trained = gemma_ppl([trained])
    assert abs(p_trained / p_base - 1) > 0.01, (p_base, p_trained)
