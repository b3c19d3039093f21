"""PEFT adapters in and out, proven against PEFT itself and against llama.cpp's own converter.

For each architecture ggtrain trains (llama, qwen2, qwen3, gemma2, gemma3) a small random Hugging
Face model is written with transformers' config classes and converted to an F32 GGUF by llama.cpp's
convert_hf_to_gguf.py (tests/hfmodels.py), so both sides hold the same weights:
  - export-peft: PeftModel.from_pretrained loads the directory and its logits are ggtrain's with
    the GGUF adapter (per-module ranks, per-layer ranks, a projection missing in a layer, lm_head);
    import-peft of it gives back the GGUF adapter bit for bit;
  - import-peft: on an adapter made by PEFT, the same tensors, names and alpha as
    convert_lora_to_gguf.py writes, and the same llama-perplexity with either; with rank_pattern,
    alpha_pattern and rsLoRA (which that converter does not read), ggtrain's logits are PEFT's;
  - an adapter PEFT trained: `ggtrain perplexity --lora DIR` is PEFT's own perplexity, and
    `ggtrain finetune --lora-in DIR` starts at the loss PEFT ended with;
  - what a GGUF LoRA cannot hold is refused in one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import llamacpp
import numpy as np
import pytest
import torch
from hfmodels import ARCHS, hf_gguf, hf_model_dir, load_hf_model, run_converter
from loras import refused
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from ggtrain.adapters.gguf_lora import read_gguf_adapter, write_gguf_adapter
from ggtrain.adapters.load import load_adapter
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraWeights
from ggtrain.model.transformer import Adapter, Batch, Model

GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
TEXT = Path("/usr/share/common-licenses/GPL-3")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYER = 2


def run(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*GGTRAIN, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r



def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 1024, size=(1, n)).astype(np.int32)


def ggtrain_logits(gguf: Path, lora: LoraWeights | None, toks: np.ndarray) -> np.ndarray:
    m = Model(ModelFile(gguf))
    if lora is not None:
        m.adapters.append(Adapter(lora))
    return m.logits(Batch.from_rows(toks, toks, np.ones(toks.shape, np.float32)), np.arange(toks.shape[1]))


def peft_logits(arch: str, peft_dir: Path, toks: np.ndarray) -> np.ndarray:
    model = PeftModel.from_pretrained(load_hf_model(arch), peft_dir).eval()
    with torch.no_grad():
        return model(torch.from_numpy(toks.astype(np.int64))).logits[0].numpy()


def assert_same_logits(ours: np.ndarray, theirs: np.ndarray, without: np.ndarray) -> None:
    """f32 agreement, and an adapter that matters far beyond it (else the check proves nothing)."""
    scale = float(np.abs(theirs).max())
    assert np.abs(ours - theirs).max() <= 1e-5 * max(scale, 1.0) * 10, np.abs(ours - theirs).max()
    assert np.abs(theirs - without).max() > 0.1 * scale


def same_tensors(a_path: Path, b_path: Path) -> None:
    a, b = ModelFile(a_path, check_types=False), ModelFile(b_path, check_types=False)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.qtype, t.shape) == (u.qtype, u.shape), name
        assert bytes(t.data) == bytes(u.data), name
    assert a.metadata["adapter.lora.alpha"] == b.metadata["adapter.lora.alpha"]
    assert a.metadata["general.architecture"] == b.metadata["general.architecture"]


def peft_made_adapter(arch: str, out: Path, seed: int = 0, **config: object) -> Path:
    """An adapter made and saved by PEFT itself, with random (not zero) B so that it matters."""
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": HF_TARGETS, "task_type": "CAUSAL_LM", **config}
    model = get_peft_model(load_hf_model(arch), PeftLoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in name else 0.2))
    model.save_pretrained(out)
    return out


# --- export-peft --------------------------------------------------------------------------------

def gguf_adapter(arch: str, base: ModelFile, path: Path) -> Path:
    """A GGUF adapter as ggtrain writes them, with what PEFT needs patterns for: per-target ranks
    (attn_v 2, ffn_down 6), a per-layer rank (layer 1's attn_q: 3), a projection missing in a layer
    (ffn_up of layer 0), a per-target alpha (attn_k: folded into B), and on llama's untied head a
    LoRA on output.weight (lm_head)."""
    rank = {"attn_v": 2, "ffn_down": 6}
    layout = {}
    for il in range(N_LAYER):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            if (il, t) == (0, "ffn_up"):
                continue
            name = f"blk.{il}.{t}.weight"
            r = 3 if (il, t) == (1, "attn_q") else rank.get(t, 4)
            o, i = base.tensors[name].shape
            layout[name] = (o, i, r, 3.0 if t == "attn_k" else 8.0, 0.0)
    if arch == "llama":
        o, i = base.tensors["output.weight"].shape
        layout["output.weight"] = (o, i, 2, 8.0, 0.0)
    lora = LoraWeights(layout)
    rng = np.random.default_rng(1)
    for e in lora.entries.values():
        e.A[...] = rng.uniform(-1, 1, e.A.shape) / math.sqrt(e.A.shape[1])
        e.B[...] = rng.standard_normal(e.B.shape) * 0.3
    return write_gguf_adapter(path, lora, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_peft_with_ggtrains_logits_and_imports_back_exactly(arch: str, tmp_path: Path) -> None:
    gguf = hf_gguf(arch)
    base = ModelFile(gguf)
    adapter = gguf_adapter(arch, base, tmp_path / "adapter.gguf")
    out = tmp_path / "peft"
    r = ok(run("export-peft", adapter, "-o", out, "-m", gguf, "--base-model-id", f"tiny/{arch}"))
    assert "note:" not in r.stderr  # a Hub id was given: nothing to warn about

    cfg = json.loads((out / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                "lora_dropout", "bias", "fan_in_fan_out", "use_rslora", "use_dora", "modules_to_save",
                "base_model_name_or_path"):
        assert key in cfg, key
    assert (cfg["peft_type"], cfg["task_type"], cfg["bias"], cfg["base_model_name_or_path"]) == \
        ("LORA", "CAUSAL_LM", "none", f"tiny/{arch}")
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["use_rslora"], cfg["modules_to_save"]) == \
        (4, 8, False, False, None)
    assert cfg["rank_pattern"] == {"v_proj": 2, "down_proj": 6, "model.layers.1.self_attn.q_proj": 3,
                                   **({"lm_head": 2} if arch == "llama" else {})}
    assert cfg["exclude_modules"] == ["model.layers.0.mlp.up_proj"]
    assert ("lm_head" in cfg["target_modules"]) == (arch == "llama")
    card = (out / "README.md").read_text()
    for what in (f"base_model: tiny/{arch}", "PeftModel.from_pretrained", "LORA_ADAPTERS=", "--lora-modules",
                 "llama-cli", "--lora adapter.gguf"):
        assert what in card, what

    toks = tokens(40)
    lora, _, _ = read_gguf_adapter(adapter, base=base)
    assert_same_logits(ggtrain_logits(gguf, lora, toks), peft_logits(arch, out, toks),
                       ggtrain_logits(gguf, None, toks))

    back = tmp_path / "back.gguf"
    ok(run("import-peft", out, "-m", gguf, "-o", back))
    same_tensors(adapter, back)


def test_export_of_an_alpha_zero_adapter_writes_alpha_pattern(tmp_path: Path) -> None:
    """llama.cpp reads adapter.lora.alpha 0 as 'no alpha/r factor': every tensor's scale is 1, so
    tensors of another rank need their own alpha (= their rank) in PEFT's config."""
    import gguf as gguf_py

    arch = "qwen2"
    gguf = hf_gguf(arch)
    base = ModelFile(gguf)
    rng = np.random.default_rng(5)
    path = tmp_path / "alpha0.gguf"
    w = gguf_py.GGUFWriter(path, arch)
    w.add_type(gguf_py.GGUFType.ADAPTER)
    w.add_string(gguf_py.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf_py.Keys.Adapter.LORA_ALPHA, 0.0)
    for il in range(N_LAYER):
        for t, r in (("attn_q", 4), ("attn_v", 2), ("ffn_down", 4)):
            o, i = base.tensors[f"blk.{il}.{t}.weight"].shape
            w.add_tensor(f"blk.{il}.{t}.weight.lora_a", (rng.standard_normal((r, i)) * 0.1).astype(np.float32))
            w.add_tensor(f"blk.{il}.{t}.weight.lora_b", (rng.standard_normal((o, r)) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "peft"
    r = ok(run("export-peft", path, "-o", out, "-m", gguf))
    assert "not a Hugging Face id" in r.stderr  # the tiny base has a general.name only
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == \
        (4, 4, {"v_proj": 2}, {"v_proj": 2})
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    toks = tokens(32, seed=3)
    lora, _, _ = read_gguf_adapter(path, base=base)
    assert_same_logits(ggtrain_logits(gguf, lora, toks), peft_logits(arch, out, toks),
                       ggtrain_logits(gguf, None, toks))


def test_export_of_a_llama_adapter_needs_the_base_for_its_q_k_rows(tmp_path: Path) -> None:
    gguf = hf_gguf("llama")
    adapter = gguf_adapter("llama", ModelFile(gguf), tmp_path / "a.gguf")
    line = refused(run("export-peft", adapter, "-o", tmp_path / "out"))
    assert str(adapter) in line and "-m BASE.gguf" in line
    ok(run("export-peft", adapter, "-o", tmp_path / "out", "-m", gguf))
    line = refused(run("export-peft", adapter, "-o", tmp_path / "out", "-m", gguf))
    assert "--overwrite" in line
    ok(run("export-peft", adapter, "-o", tmp_path / "out", "-m", gguf, "--overwrite"))


# --- import-peft ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_import_writes_what_convert_lora_to_gguf_writes(arch: str, tmp_path: Path) -> None:
    gguf = hf_gguf(arch)
    peft_dir = peft_made_adapter(arch, tmp_path / "peft", rank_pattern={"v_proj": 2, "down_proj": 6})
    theirs, ours = tmp_path / "converted.gguf", tmp_path / "imported.gguf"
    run_converter("convert_lora_to_gguf.py", "--base", hf_model_dir(arch), "--outfile", theirs, peft_dir)
    ok(run("import-peft", peft_dir, "-m", gguf, "-o", ours))
    same_tensors(theirs, ours)  # names, types, shapes, bytes (q/k rows of llama's B permuted alike), alpha

    ppl_theirs, _ = llamacpp.perplexity(gguf, TEXT, ctx=64, chunks=3, lora=[theirs])
    ppl_ours, _ = llamacpp.perplexity(gguf, TEXT, ctx=64, chunks=3, lora=[ours])
    ppl_base, _ = llamacpp.perplexity(gguf, TEXT, ctx=64, chunks=3)
    assert ppl_ours == ppl_theirs
    assert abs(ppl_ours - ppl_base) > 0.01 * ppl_base


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_import_honours_rank_and_alpha_patterns_rslora_and_lm_head(arch: str, tmp_path: Path) -> None:
    """What convert_lora_to_gguf.py does not read (it takes lora_alpha alone): per-module alphas and
    rsLoRA's alpha/√r are folded into B; PEFT's logits and ggtrain's agree, through import-peft's
    GGUF and through the directory given as the adapter directly."""
    gguf = hf_gguf(arch)
    targets = HF_TARGETS + (["lm_head"] if arch == "llama" else [])
    peft_dir = peft_made_adapter(arch, tmp_path / "peft", seed=2, target_modules=targets, use_rslora=True,
                                 rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
                                 alpha_pattern={"k_proj": 3, "o_proj": 5})
    out = tmp_path / "imported.gguf"
    ok(run("import-peft", peft_dir, "-m", gguf, "-o", out))
    base = ModelFile(gguf)
    toks = tokens(48, seed=1)
    want = peft_logits(arch, peft_dir, toks)
    without = ggtrain_logits(gguf, None, toks)
    assert_same_logits(ggtrain_logits(gguf, read_gguf_adapter(out, base=base)[0], toks), want, without)
    assert_same_logits(ggtrain_logits(gguf, load_adapter(peft_dir, base)[0], toks), want, without)


def test_perplexity_takes_a_peft_directory_with_a_scale(tmp_path: Path) -> None:
    arch = "qwen3"
    gguf = hf_gguf(arch)
    peft_dir = peft_made_adapter(arch, tmp_path / "peft")
    imported = tmp_path / "imported.gguf"
    ok(run("import-peft", peft_dir, "-m", gguf, "-o", imported))
    common = ["perplexity", "-m", gguf, "-f", TEXT, "-c", "64", "--chunks", "3", "-t", "2"]
    finals = {}
    for name, lora in (("dir", f"{peft_dir}:0.5"), ("gguf", f"{imported}:0.5")):
        out = ok(run(*common, "--lora", lora)).stdout
        finals[name] = next(x for x in out.splitlines() if x.startswith("Final estimate"))
    assert finals["dir"] == finals["gguf"]
    ours = float(finals["dir"].split("PPL = ")[1].split()[0])
    half, _ = llamacpp.perplexity(gguf, TEXT, ctx=64, chunks=3, lora=[(imported, 0.5)])
    full, _ = llamacpp.perplexity(gguf, TEXT, ctx=64, chunks=3, lora=[imported])
    assert abs(ours - half) <= 1e-3 * half and abs(full - half) > 0.01 * half
    line = refused(run(*common, "--lora", tmp_path))
    assert str(tmp_path) in line and "adapter_config.json" in line


def test_bfloat16_and_float16_adapters_read_as_their_float32_values(tmp_path: Path) -> None:
    """Adapters trained on GPUs are often saved in bfloat16, which numpy has no type for."""
    from safetensors.torch import load_file, save_file

    arch = "gemma2"
    gguf = hf_gguf(arch)
    src = peft_made_adapter(arch, tmp_path / "f32")
    weights = load_file(src / "adapter_model.safetensors")
    outs = {}
    for dtype in (torch.bfloat16, torch.float16):
        d = tmp_path / str(dtype).split(".")[-1]
        shutil.copytree(src, d)
        save_file({k: v.to(dtype) for k, v in weights.items()}, d / "adapter_model.safetensors")
        wide = tmp_path / f"{d.name}-as-f32"
        shutil.copytree(src, wide)
        save_file({k: v.to(dtype).float() for k, v in weights.items()}, wide / "adapter_model.safetensors")
        for x in (d, wide):
            outs[x.name] = tmp_path / f"{x.name}.gguf"
            ok(run("import-peft", x, "-m", gguf, "-o", outs[x.name]))
        same_tensors(outs[d.name], outs[wide.name])


def test_export_and_import_need_no_torch(tmp_path: Path) -> None:
    """The runtime dependencies are numpy + safetensors: with torch, transformers and peft made
    unimportable, both directions still run."""
    gguf = hf_gguf("llama")
    adapter = gguf_adapter("llama", ModelFile(gguf), tmp_path / "adapter.gguf")
    code = ("import sys; sys.modules.update(torch=None, transformers=None, peft=None)\n"
            "from ggtrain.cli.main import main\n"
            "for args in (['export-peft', sys.argv[1], '-o', sys.argv[2], '-m', sys.argv[3]],\n"
            "             ['import-peft', sys.argv[2], '-m', sys.argv[3], '-o', sys.argv[4]]):\n"
            "    try:\n"
            "        main(args)\n"
            "    except SystemExit as e:\n"
            "        assert not e.code, e.code\n")
    r = subprocess.run([sys.executable, "-c", code, str(adapter), str(tmp_path / "peft"), str(gguf),
                        str(tmp_path / "back.gguf")], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    same_tensors(adapter, tmp_path / "back.gguf")


# --- refusals ---------------------------------------------------------------------------------------

def _edit_config(d: Path, **changes: object) -> Path:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_import_refuses_what_a_gguf_lora_cannot_hold(tmp_path: Path) -> None:
    from tinymodels import tiny_model

    llama = hf_gguf("llama")
    good = peft_made_adapter("llama", tmp_path / "good")

    def variant(name: str, **changes: object) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        return _edit_config(d, **changes)

    no_weights = variant("no-weights")
    (no_weights / "adapter_model.safetensors").rename(no_weights / "adapter_model.bin")
    wrong_rank = variant("wrong-rank", rank_pattern={"q_proj": 8})
    not_json = variant("not-json")
    (not_json / "adapter_config.json").write_text("{r: 4")
    cases = [  # (directory, base, what the one line must say)
        (variant("dora", use_dora=True), llama, "adapter_config.json: use_dora = true: DoRA"),
        (variant("mts", modules_to_save=["lm_head"]), llama, 'adapter_config.json: modules_to_save = ["lm_head"]'),
        (variant("bias", bias="lora_only"), llama, 'adapter_config.json: bias = "lora_only"'),
        (variant("lora-bias", lora_bias=True), llama, "adapter_config.json: lora_bias = true"),
        (variant("ia3", peft_type="IA3"), llama, 'adapter_config.json: peft_type = "IA3"'),
        (variant("alpha0", lora_alpha=0), llama, "adapter_config.json: lora_alpha = 0"),
        (wrong_rank, llama, "'base_model.model.model.layers.0.self_attn.q_proj': lora_A has rank 4, but"),
        (no_weights, llama, "no adapter_model.safetensors (only adapter_model.bin"),
        (not_json, llama, "adapter_config.json: not valid JSON"),
        (good, tiny_model("llama", "F32"), ("'base_model.model.model.layers.0.self_attn.q_proj' is 64 x 64 "
                                           "(out x in), but blk.0.attn_q.weight of the base model")),
        (peft_made_adapter("llama", tmp_path / "embd", target_modules=["embed_tokens", "q_proj"]), llama,
         "adapter_model.safetensors: tensor 'base_model.model.model.embed_tokens.lora_embedding_"),
        (peft_made_adapter("qwen2", tmp_path / "head", target_modules=["q_proj", "lm_head"]), hf_gguf("qwen2"),
         "tensor 'base_model.model.lm_head.lora_A.weight': a LoRA on lm_head, but the base model"),
    ]
    for d, base, want in cases:
        line = refused(run("import-peft", d, "-m", base, "-o", tmp_path / "out.gguf"))
        assert want in line and str(d) in line, (d.name, line)
    assert not (tmp_path / "out.gguf").exists()


# --- an adapter PEFT trained, measured and trained further here ------------------------------------

def torch_loss(model: torch.nn.Module, batch: object) -> torch.Tensor:
    """Mean cross-entropy over the trained targets of a ggtrain data batch (rows of one window each)."""
    logits = model(torch.from_numpy(batch.tokens.astype(np.int64))).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            torch.from_numpy(batch.targets.astype(np.int64)).reshape(-1),
                                            reduction="none")
    mask = torch.from_numpy(batch.mask).reshape(-1)
    return (nll * mask).sum() / mask.sum()


def torch_perplexity(model: torch.nn.Module, toks: np.ndarray, n_ctx: int, n_chunks: int, bos: int) -> float:
    """llama-perplexity's method (ggtrain.model.perplexity): BOS first, the second half of each chunk scored."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(n_chunks):
            row = toks[c * n_ctx:(c + 1) * n_ctx].astype(np.int64).copy()
            target = row[1:].copy()
            row[0] = bos
            logp = torch.log_softmax(model(torch.from_numpy(row[None])).logits[0].double(), -1)
            scored = np.arange(n_ctx // 2, n_ctx - 1)  # position j predicts the chunk's token j + 1
            nll -= float(logp[scored, target[scored]].sum())
            count += len(scored)
    return math.exp(nll / count)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_peft_trained_adapter_perplexity_and_training_further(arch: str, tmp_path: Path) -> None:
    from ggtrain.dataset.batches import DataOptions, load_batches
    from ggtrain.text.tokenizer import Tokenizer

    gguf = hf_gguf(arch)
    mf = ModelFile(gguf)
    tok = Tokenizer.from_model_file(mf)
    text = TEXT.read_text()
    train_txt = tmp_path / "train.txt"
    train_txt.write_text(text[:2000])
    ctx = 64
    opts = DataOptions(train_data=train_txt, format="text", ctx=ctx, seed=7)
    batches, _, _ = load_batches(opts, tok, 64, mf)
    rows = batches.rows_in_epoch(0)
    data = batches.get(0, 0, rows)  # all of it: one finetune step with -b rows is this whole batch
    # One window a row, from column 0 (the last row's tail is padding, masked out of the loss): the
    # HF model's plain causal forward over a row sees exactly what ggtrain's does.
    real = data.segments == 1
    assert rows >= 4 and ((data.segments == 0) | real).all() and real[:, 0].all()
    assert (data.positions[real] == np.broadcast_to(np.arange(ctx), real.shape)[real]).all()
    assert (data.mask[~real] == 0).all()

    torch.manual_seed(0)
    model = get_peft_model(load_hf_model(arch), PeftLoraConfig(r=8, lora_alpha=16, target_modules=HF_TARGETS,
                                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(25):
        opt.zero_grad()
        loss = torch_loss(model, data)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = float(torch_loss(model, data))
    assert last < loss.item()  # it did train
    peft_dir = tmp_path / "peft"
    model.save_pretrained(peft_dir)

    # perplexity: PEFT's own on the rest of the text, and ggtrain's with the directory as the adapter
    ppl_txt = tmp_path / "ppl.txt"
    ppl_txt.write_text(text[2000:8000])
    ids = np.asarray(tok.encode(ppl_txt.read_text(), add_special=True, parse_special=False), dtype=np.int32)
    n_chunks = 4
    assert len(ids) >= n_chunks * ctx
    want = torch_perplexity(model, ids, ctx, n_chunks, tok.bos_id)
    base_ppl = torch_perplexity(load_hf_model(arch), ids, ctx, n_chunks, tok.bos_id)
    assert abs(want - base_ppl) > 0.02 * base_ppl
    out = ok(run("perplexity", "-m", gguf, "-f", ppl_txt, "-c", ctx, "--chunks", n_chunks, "-t", "2",
                 "--lora", peft_dir)).stdout
    ours = float(out.split("Final estimate: PPL = ")[1].split()[0])
    assert abs(ours - want) <= 0.01 * want, (ours, want)

    # trained further: the first step's loss is PEFT's last
    outdir = tmp_path / "run"
    ok(run("finetune", "-m", gguf, "--train-data", train_txt, "--format", "text", "-c", ctx, "-b", rows,
           "--seed", 7, "--adam-iter", 2, "--save-every", 0, "-t", 2, "--outdir", outdir, "--lora-in", peft_dir))
    log = [json.loads(x) for x in (outdir / "train_log.jsonl").read_text().splitlines()]
    step_losses = {x["step"]: x["loss"] for x in log if "loss" in x}
    assert abs(step_losses[1] - last) <= 1e-4 * last, (step_losses, last)
    assert step_losses[2] < step_losses[1]
    latest = next(outdir.glob("*LATEST*.gguf"))
    trained, _, _ = read_gguf_adapter(latest, base=mf)
    start = load_adapter(peft_dir, mf)[0]
    assert trained.layout.keys() == start.layout.keys()
    assert {n: e.rank for n, e in trained.entries.items()} == {n: e.rank for n, e in start.entries.items()}

    # ... and back to PEFT: the model card tells the run, and PEFT's logits are ggtrain's
    again = tmp_path / "again"
    ok(run("export-peft", latest, "-o", again, "-m", gguf, "--base-model-id", f"tiny/{arch}"))
    card = (again / "README.md").read_text()
    for what in ("data: `train.txt`", f"batch: {rows}", f"context (tokens per row): {ctx}", "steps: 2",
                 f"training loss: {step_losses[1]:.4f} at step 1, {step_losses[2]:.4f} at step 2"):
        assert what in card, (what, card)
    toks = tokens(40, seed=4)
    assert_same_logits(ggtrain_logits(gguf, trained, toks), peft_logits(arch, again, toks),
                       ggtrain_logits(gguf, None, toks))

    line = refused(run("finetune", "-m", gguf, "--train-data", train_txt, "--format", "text", "-c", ctx,
                         "--outdir", tmp_path / "x", "--lora-in", peft_dir, "--lora-r", 4, "--rank-wq", 2))
    assert "--lora-in" in line and "--lora-r" in line and "--rank-wq" in line
