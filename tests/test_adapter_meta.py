"""Adapters say what they are: lineage, base fingerprint, targets and ranks, the run's figures; `ggtrain info`
describes them; and a wrong base is caught wherever an adapter is used (each case in a subprocess)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from loras import TEXT, ggtrain, ok, random_adapter, refused, write_base
from tinymodels import tiny_model

from ggtrain import __version__
from ggtrain.adapters.gguf_lora import read_gguf_adapter, write_gguf_adapter
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
from ggtrain.train.checkpoint import model_fingerprint

LINEAGE = {"name": "Tiny Chat 1B", "organization": "Example Org", "version": "v2", "author": "someone",
           "repo_url": "https://example.org/tiny-chat", "description": "a fine-tune of Tiny Base"}


def write_finetuned_base(path: Path) -> ModelFile:
    """A llama-like GGUF with the usual general.* fields, itself a fine-tune of another model."""
    def lineage(w: gguf.GGUFWriter) -> None:
        for field, value in LINEAGE.items():
            if field != "name":
                w.add_string(f"general.{field}", value)
        w.add_string("general.basename", "tiny-chat")
        w.add_string("general.size_label", "1B")
        w.add_base_model_count(1)  # its own parent: not the adapter's
        w.add_base_model_name(0, "Tiny Base")
        w.add_base_model_organization(0, "Grandparents Inc")

    return write_base(path, name=LINEAGE["name"], metadata=lineage)


def test_adapter_records_lineage_fingerprint_targets_and_ranks(tmp_path: Path) -> None:
    base = write_finetuned_base(tmp_path / "tiny-chat.gguf")
    cfg = LoraConfig.make(r=4, alpha=8, targets=("attn_q", "attn_v", "ffn_down", "output"),
                          ranks={"ffn_down": 2, "output": 3})
    lw = LoraWeights.init(cfg, target_shapes(base.tensors, cfg, 2))
    path = write_gguf_adapter(tmp_path / "a.gguf", lw, base, extra_meta={"training.steps": 5})
    f = gguf.GGUFReader(path).fields  # an independent reader
    assert f["general.base_model.count"].contents() == 1 and "general.base_model.1.name" not in f
    for field, value in LINEAGE.items():
        assert f[f"general.base_model.0.{field}"].contents() == value, field
    assert f["general.basename"].contents() == "tiny-chat" and f["general.size_label"].contents() == "1B"
    assert f["general.name"].contents() == "Tiny Chat 1B LoRA"
    fp = f["ggtrain.adapters.gguf_lora.base_fingerprint"].contents()
    assert fp == base.fingerprint() == model_fingerprint(ModelFile(base.path)) and len(fp) == 64
    assert f["ggtrain.adapter.base_file"].contents() == "tiny-chat.gguf"
    assert f["ggtrain.adapters.gguf_lora.targets"].contents() == ["attn_q", "attn_v", "ffn_down", "output"]
    assert f["ggtrain.adapters.gguf_lora.ranks"].contents() == [4, 4, 2, 3]
    assert f["ggtrain.adapters.gguf_lora.ranks"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert f["ggtrain.version"].contents() == __version__ and f["training.steps"].contents() == 5
    _, _, meta = read_gguf_adapter(path, ModelFile(base.path), warn=pytest.fail)  # the round trip: no note
    assert meta["ggtrain.adapters.gguf_lora.base_fingerprint"] == fp


def test_the_fingerprint_tells_quantizations_and_models_apart() -> None:
    kinds = (("llama", "Q8_0", 0), ("llama", "Q4_K", 0), ("llama", "Q8_0", 1), ("qwen3", "Q8_0", 0))
    fps = {k: ModelFile(tiny_model(k[0], k[1], seed=k[2])).fingerprint() for k in kinds}
    assert len(set(fps.values())) == len(fps)
    assert ModelFile(tiny_model("llama", "Q8_0")).fingerprint() == fps["llama", "Q8_0", 0]  # stable


def field(out: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}:\s+(.*)$", out, re.MULTILINE)
    assert m, f"no '{label}:' line in:\n{out}"
    return m.group(1).strip()


def test_info_describes_what_finetune_wrote(tmp_path: Path) -> None:
    base = tiny_model("llama", "Q8_0")
    out = tmp_path / "run"
    r = ok(ggtrain("finetune", "-m", base, "--train-data", TEXT, "--format", "text", "-c", "32", "-b", "2",
                   "--adam-iter", "3", "--save-every", "0", "-t", "2", "--lora-r", "2", "--rank-wq", "4",
                   "--lora-alpha", "16", "--val-split", "0.1", "--outdir", out))
    adapter = Path(re.search(r"^adapter: +(\S+)$", r.stdout, re.MULTILINE)[1])
    info = ok(ggtrain("info", adapter)).stdout
    print(info)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in log if "loss" in x]

    assert field(info, "type").startswith("LoRA adapter")
    assert field(info, "base model") == (f"tiny-llama-s0 (file {base.name}, fingerprint "
                                         f"{ModelFile(base).fingerprint()})")
    assert field(info, "targets") == ("attn_q r4, attn_k r2, attn_v r2, attn_output r2, ffn_gate r2, "
                                      "ffn_up r2, ffn_down r2 (2 layers)")
    assert field(info, "alpha") == "16: scale alpha / r = 8 at r2, 4 at r4 (times --lora-scaled)"
    assert field(info, "tensor type") == "F32 (28 tensors)"
    n_params = sum(t.n_elements for t in ModelFile(adapter).tensors.values())
    assert field(info, "size").startswith(f"{n_params:,} parameters in 14 pairs")
    tokens, trained = sum(x["tokens"] for x in steps), sum(x["trained_tokens"] for x in steps)
    assert field(info, "training") == f"3 steps, 0 epochs completed, {tokens:,} tokens ({trained:,} trained)"
    val = next(x["val_loss"] for x in log if "val_loss" in x)
    loss = field(info, "loss")
    assert loss.startswith(f"last step {steps[-1]['loss']:.4f}, smoothed ")
    assert loss.endswith(f"validation {val:.4f}")
    assert field(info, "data") == f"GPL-3 (sha256 {hashlib.sha256(TEXT.read_bytes()).hexdigest()})"
    assert field(info, "written by") == f"ggtrain {__version__}"
    f = gguf.GGUFReader(adapter).fields
    assert f["training.tokens"].contents() == sum(x["tokens"] for x in steps)
    assert f["training.loss"].contents() == pytest.approx(steps[-1]["loss"], rel=1e-6)


def handmade_adapter(path: Path, base: Path, name: str = "blk.0.attn_q.weight") -> Path:
    """An adapter as llama.cpp's converter writes one: llama.cpp's keys and tensors only."""
    n_out, n_in = ModelFile(base).tensors[name].shape
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, ModelFile(base).architecture)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 4.0)
    w.add_tensor(f"{name}.lora_a", (rng.standard_normal((2, n_in)) * 0.01).astype(np.float16))
    w.add_tensor(f"{name}.lora_b", (rng.standard_normal((n_out, 2)) * 0.01).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_info_on_an_adapter_that_records_nothing(tmp_path: Path) -> None:
    adapter = handmade_adapter(tmp_path / "converted.gguf", tiny_model("llama", "Q8_0"))
    info = ok(ggtrain("info", adapter)).stdout
    assert field(info, "base model") == "not recorded" and field(info, "training") == "not recorded"
    assert field(info, "targets") == "attn_q r2 (1 layers)"
    assert field(info, "alpha") == "4: scale alpha / r = 2 at r2 (times --lora-scaled)"
    assert field(info, "tensor type") == "F16 (2 tensors)"


def test_info_on_another_tools_adapter_with_ranks_that_differ_by_layer(tmp_path: Path) -> None:
    """Targets ggtrain does not train (a fused attn_qkv) are still described, ranks per layer noted."""
    w = gguf.GGUFWriter(tmp_path / "phi3.gguf", "phi3")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    for il, r in enumerate((8, 8, 4)):
        w.add_tensor(f"blk.{il}.attn_qkv.weight.lora_a", np.zeros((r, 64), np.float32))
        w.add_tensor(f"blk.{il}.attn_qkv.weight.lora_b", np.zeros((192, r), np.float32))
        w.add_tensor(f"blk.{il}.ffn_down.weight.lora_a", np.zeros((8, 64), np.float32))
        w.add_tensor(f"blk.{il}.ffn_down.weight.lora_b", np.zeros((64, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = ok(ggtrain("info", tmp_path / "phi3.gguf")).stdout
    assert field(info, "targets") == "ffn_down r8, attn_qkv r4-8 (ranks differ by layer) (3 layers)"
    assert field(info, "alpha") == "16: scale alpha / r = 4 at r4, 2 at r8 (times --lora-scaled)"
    assert field(info, "size").startswith("8,192 parameters in 6 pairs")


def test_info_says_what_a_merged_model_was_made_from(tmp_path: Path) -> None:
    base = tiny_model("llama", "Q8_0")
    adapter = random_adapter(base, tmp_path / "a.gguf")
    ok(ggtrain("merge", "-m", base, "--lora", adapter, "-o", tmp_path / "m.gguf"))
    info = ok(ggtrain("info", tmp_path / "m.gguf")).stdout
    want = "tiny-llama-s0 + tiny-llama-s0 LoRA (merged by ggtrain, --outtype f16)"
    assert field(info, "derived from") == want
    assert field(info, "architecture") == "llama"


# -- a wrong base, wherever an adapter is used --------------------------------------------------------------
def use(command: str, base: Path, adapter: Path, tmp: Path) -> list[str | Path]:
    if command == "perplexity":
        return ["perplexity", "-m", base, "-f", TEXT, "-c", "16", "--chunks", "1", "-t", "2",
                "--lora", adapter]
    if command == "merge":
        return ["merge", "-m", base, "--lora", adapter, "-o", tmp / "merged.gguf"]
    return ["ollama", "-m", base, "--lora", adapter, "-o", tmp / "Modelfile"]


COMMANDS = ("perplexity", "merge", "ollama")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("wrong-base")
    return {
        "q8": random_adapter(tiny_model("llama", "Q8_0"), d / "trained-on-q8.gguf",
                             targets=("attn_q", "ffn_up")),
        "gemma3": random_adapter(tiny_model("gemma3", "F32"), d / "trained-on-gemma3.gguf",
                                 targets=("attn_q", "ffn_up")),
        "narrow": random_adapter(tiny_model("llama", "Q8_0", n_embd=128), d / "trained-on-narrow.gguf",
                                 targets=("attn_q", "ffn_up")),
        "converted": handmade_adapter(d / "converted.gguf", tiny_model("llama", "Q8_0")),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_another_architecture_is_refused_naming_both_files(command: str, adapters: dict[str, Path],
                                                           tmp_path: Path) -> None:
    base = tiny_model("llama", "Q8_0")  # the gemma3 tiny model's attn_q / ffn_up have these very shapes
    err = refused(ggtrain(*use(command, base, adapters["gemma3"], tmp_path)))
    want = f"{adapters['gemma3']}: adapter is for architecture 'gemma3', the base model {base} is 'llama'"
    assert want in err
    assert "trained on 'tiny-gemma3-s0'" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_other_shapes_are_refused_naming_both_files_and_the_tensor(command: str, adapters: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    base = tiny_model("llama", "Q8_0")
    err = refused(ggtrain(*use(command, base, adapters["narrow"], tmp_path)))
    assert (f"{adapters['narrow']}: LoRA of 'blk.0.attn_q.weight' is (128, 128), the base model {base} has "
            "(256, 256)") in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_another_quantization_of_the_base_gets_a_note(command: str, adapters: dict[str, Path],
                                                      tmp_path: Path) -> None:
    base = tiny_model("llama", "Q4_K")
    r = ok(ggtrain(*use(command, base, adapters["q8"], tmp_path)))
    notes = [x for x in r.stderr.splitlines() if x.startswith("note: ")]
    trained = tiny_model("llama", "Q8_0")
    want = (f"note: {adapters['q8']} was trained on 'tiny-llama-s0' ({trained.name}) (fingerprint "
            f"{ModelFile(trained).fingerprint()[:12]}), this base {base} is 'tiny-llama-s0' (fingerprint "
            f"{ModelFile(base).fingerprint()[:12]}): fine if it is another quantization of the same model")
    assert notes == [want]


@pytest.mark.parametrize("command", COMMANDS)
def test_another_model_of_the_same_shapes_gets_a_note_naming_both(command: str, adapters: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    base = tiny_model("llama", "Q8_0", seed=1)
    r = ok(ggtrain(*use(command, base, adapters["q8"], tmp_path)))
    note = next(x for x in r.stderr.splitlines() if x.startswith("note: "))
    assert f"{adapters['q8']} was trained on 'tiny-llama-s0'" in note
    assert f"this base {base} is 'tiny-llama-s1'" in note
    assert "another name, too" in note


@pytest.mark.parametrize("command", COMMANDS)
def test_an_adapter_without_fingerprint_is_taken_as_it_is(command: str, adapters: dict[str, Path],
                                                          tmp_path: Path) -> None:
    r = ok(ggtrain(*use(command, tiny_model("llama", "Q4_K"), adapters["converted"], tmp_path)))
    assert "note:" not in r.stderr and "warning" not in r.stderr.lower()
