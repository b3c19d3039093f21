"""Whole-model LoRA gradients against central finite differences, on tiny GGUFs of every architecture.

The model runs in float32, so each check is a directional derivative along a direction restricted
to one projection's A and B matrices (all layers): (L(θ+εd) - L(θ-εd)) / 2ε against g·d, which
averages float32 noise over many parameters instead of one.
"""

from __future__ import annotations

import numpy as np
import pytest
from tinymodels import tiny_model

from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
from ggtrain.model.transformer import Batch, Model

ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def make_model(arch: str, qtype: str = "F32", dropout: float = 0.0, targets=TARGETS) -> Model:
    mf = ModelFile(tiny_model(arch, qtype))
    model = Model(mf)
    cfg = LoraConfig.make(r=4, alpha=8, dropout=dropout, targets=targets)
    lora = LoraWeights.init(cfg, target_shapes(mf.tensors, cfg, model.hp.n_layer), seed=0)
    rng = np.random.default_rng(1)
    for e in lora.entries.values():  # B != 0 so that A has a gradient too
        e.B[...] = rng.normal(0, 0.05, e.B.shape).astype(np.float32)
    model = model.with_trainable(lora)
    return model


def packed_batch(n_vocab: int, T: int = 40) -> Batch:
    """Two samples packed in one row (positions restart, attention stays inside each), half masked."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, min(n_vocab, 2000), T + 1).astype(np.int32)
    cut = 17
    positions = np.concatenate([np.arange(cut), np.arange(T - cut)]).astype(np.int32)
    segments = np.concatenate([np.zeros(cut), np.ones(T - cut)]).astype(np.int32)
    mask = (rng.random(T) < 0.6).astype(np.float32)
    return Batch.from_rows(tokens[None, :-1], tokens[None, 1:], mask[None], positions[None], segments[None])


def directional_check(model: Model, batch: Batch, names_filter: str, step_seed: int = 0) -> tuple[float, float]:
    lora = model.trainable
    grads = lora.zeros_like()
    _, state = model.forward(batch, train=True, step_seed=step_seed)
    model.backward(state, grads)
    # Direction: half along the gradient (so g·d stands well above float32 noise), half random
    # (so a gradient that is wrong in direction, not just in size, shows).
    d = lora.zeros_like()
    rng = np.random.default_rng(3)
    for name, e in d.entries.items():
        if names_filter in name:
            e.A[...] = rng.normal(size=e.A.shape)
            e.B[...] = rng.normal(size=e.B.shape)
    sel = d.flat != 0
    g_sel = np.where(sel, grads.flat, 0.0)
    d.flat[...] = d.flat / np.linalg.norm(d.flat) + g_sel / np.linalg.norm(g_sel)
    d.flat /= np.linalg.norm(d.flat)
    analytic = float(np.dot(grads.flat.astype(np.float64), d.flat))
    eps = 1e-2
    base = lora.flat.copy()
    lora.flat[...] = base + eps * d.flat
    lp, _ = model.forward(batch, train=True, step_seed=step_seed)
    lora.flat[...] = base - eps * d.flat
    lm, _ = model.forward(batch, train=True, step_seed=step_seed)
    lora.flat[...] = base
    return analytic, (lp - lm) / (2 * eps)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gradients_match_finite_differences(arch: str) -> None:
    model = make_model(arch)
    batch = packed_batch(model.hp.n_vocab)
    for target in TARGETS:
        analytic, numeric = directional_check(model, batch, f".{target}.")
        print(f"{arch} {target}: analytic {analytic:.6e} numeric {numeric:.6e}")
        assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (target, analytic, numeric)


def test_gradients_with_dropout_match_finite_differences() -> None:
    # Dropout masks come from (step seed, layer), so the perturbed runs see the very same masks,
    # and the checkpointed backward recomputes them identically.
    model = make_model("llama", dropout=0.3)
    batch = packed_batch(model.hp.n_vocab)
    analytic, numeric = directional_check(model, batch, ".", step_seed=7)
    assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_checkpointing_gives_identical_gradients(arch: str) -> None:
    model = make_model(arch, qtype="Q8_0", dropout=0.1)
    batch = packed_batch(model.hp.n_vocab)
    out = []
    for ckpt in (True, False):
        g = model.trainable.zeros_like()
        loss, state = model.forward(batch, train=True, checkpointing=ckpt, step_seed=5)
        model.backward(state, g)
        out.append((loss, g.flat.copy()))
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert np.abs(out[0][1]).max() > 0


def test_packed_samples_do_not_see_each_other() -> None:
    # The second sample's loss must not change when the first sample's tokens change.
    model = make_model("qwen3")
    batch = packed_batch(model.hp.n_vocab)
    _, s1 = model.forward(batch, train=False)
    other = Batch(batch.tokens.copy(), batch.targets, batch.mask, batch.positions, batch.segments)
    other.tokens[:17] = (other.tokens[:17] + 11) % 1000 + 5
    _, s2 = model.forward(other, train=False)
    np.testing.assert_array_equal(s1.loss_state.losses[17:], s2.loss_state.losses[17:])
    assert not np.array_equal(s1.loss_state.losses[:16], s2.loss_state.losses[:16])


def test_with_trainable_leaves_the_model_as_it_is() -> None:
    base = Model(ModelFile(tiny_model("llama", "F32")))
    trained = make_model("llama")  # B != 0: the LoRA moves the loss
    lora = trained.trainable
    assert lora is not None and base.trainable is None
    m = base.with_trainable(lora)
    assert m.trainable is lora and base.trainable is None and m.layers is base.layers  # weights shared
    with pytest.raises(AttributeError):
        base.trainable = lora  # type: ignore[misc]
    batch = packed_batch(base.hp.n_vocab)
    assert m.forward(batch, train=False)[0] != base.forward(batch, train=False)[0]
    assert m.forward(batch, train=False)[0] == trained.forward(batch, train=False)[0]
