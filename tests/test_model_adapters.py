"""Adapters at inference: several GGUF LoRA adapters with scales, the output head included, give the
logits llama.cpp gives with the same adapters (and the tied-head case stays refused for training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llamacpp_logits import llama_logits
from tinymodels import tiny_model

from ggtrain.adapters.gguf_lora import read_gguf_adapter, write_gguf_adapter
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
from ggtrain.model.transformer import Adapter, Batch, Model


def random_adapter(mf: ModelFile, n_layer: int, targets: tuple[str, ...], r: int, seed: int) -> LoraWeights:
    cfg = LoraConfig.make(r=r, alpha=2 * r, targets=targets)
    lora = LoraWeights.init(cfg, target_shapes(mf.tensors, cfg, n_layer), seed=seed)
    rng = np.random.default_rng(seed)
    for e in lora.entries.values():
        e.B[...] = rng.normal(0, 0.05, e.B.shape).astype(np.float32)
    return lora


def test_two_scaled_adapters_with_output_head_match_llamacpp(tmp_path: Path) -> None:
    path = tiny_model("llama", "F32")  # llama keeps a separate output.weight
    mf = ModelFile(path)
    model = Model(mf)
    a1 = random_adapter(mf, model.hp.n_layer, ("attn_q", "ffn_down", "output"), 4, 1)
    a2 = random_adapter(mf, model.hp.n_layer, ("attn_v", "ffn_up"), 2, 2)
    p1 = write_gguf_adapter(tmp_path / "a1.gguf", a1, mf)
    p2 = write_gguf_adapter(tmp_path / "a2.gguf", a2, mf)
    for path_, scale in ((p1, 0.7), (p2, 1.5)):
        lora, _, _ = read_gguf_adapter(path_, base=mf, scale=scale)
        model.adapters.append(Adapter(lora))

    ids = np.random.default_rng(4).integers(10, 1000, 48).astype(np.int32)
    ref = llama_logits(path, ids, n_last=3, loras=[(p1, 0.7), (p2, 1.5)])
    base = llama_logits(path, ids, n_last=3)
    ours = model.logits(Batch.from_rows(ids[None], np.zeros((1, 48)), np.zeros((1, 48))), np.arange(45, 48))
    effect = np.abs(ref - base).max()
    diff = np.abs(ref - ours).max()
    print(f"adapters move logits by {effect:.4f}; ours vs llama.cpp max |diff| {diff:.5f}")
    assert effect > 0.1
    assert diff < 2e-3 * np.abs(ref).max()
    np.testing.assert_array_equal(ours.argmax(axis=1), ref.argmax(axis=1))


def test_training_a_lora_on_the_output_head_is_refused() -> None:
    path = tiny_model("llama", "F32")
    mf = ModelFile(path)
    model = Model(mf)
    model = model.with_trainable(random_adapter(mf, model.hp.n_layer, ("attn_q", "output"), 2, 3))
    ids = np.arange(10, 26, dtype=np.int32)
    with pytest.raises(ValueError, match="output head is not supported"):
        model.forward(Batch.from_rows(ids[None], ids[None], np.ones((1, 16))))
