"""The decoding engine: the KV-cache step gives a full recompute's logits, the loop stops as documented,
and the int8 matrix-vector kernel decoding uses is the int8 product it stands in for.

The reference for the cache is the model's own forward over the whole sequence (Model.logits, the
training forward), taken again at every step: every architecture's tiny model (q/k norms, biases,
soft-caps, sliding windows of 32 positions crossed, post-norms), with a fixed adapter on top, through
a prefill, single steps, a truncate and a second multi-token "turn" after it.
"""

from __future__ import annotations

import numpy as np
import pytest
import tinymodels
from gguf.constants import GGMLQuantizationType as Q
from loras import random_lora
from test_qmatmul_int8 import INT8_TYPES, make_weight, reference, rel_err

from ggtrain import kernels
from ggtrain.errors import GGTrainError
from ggtrain.generate.decoder import Decoder
from ggtrain.generate.kvcache import KVCache
from ggtrain.generate.sampling import GREEDY, Sampler
from ggtrain.generate.stream import generate_tokens
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig
from ggtrain.model.transformer import Adapter, Batch, Model

# f32: the cache path and the full forward add the same numbers in different orders (attention's
# softmax sums, kernel tiles); logits are O(1..10), so 1e-4 is a few hundred f32 ulps, while an
# error in a position, a mask or a rope angle moves them by 1e-2 or more.
ATOL = 1e-4


def full_logits(model: Model, ids: np.ndarray) -> np.ndarray:
    """Logits of the last token, from the training forward over all of ids."""
    t = np.asarray(ids, dtype=np.int32)[None]
    return model.logits(Batch.from_rows(t, t, np.ones(t.shape, np.float32)), np.array([t.shape[1] - 1]))[0]


def tiny(arch: str, adapter: bool = True) -> Model:
    mf = ModelFile(tinymodels.tiny_model(arch, "Q8_0"))
    model = Model(mf)
    if adapter:
        cfg = LoraConfig.make(r=4, alpha=8, targets=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                      "ffn_up", "ffn_down"))
        model.adapters.append(Adapter(random_lora(mf, cfg, model.hp.n_layer, seed=3, b_std=0.2), scale=-0.7))
    return model


@pytest.mark.parametrize("arch", tinymodels.ARCHS)
def test_cached_steps_equal_a_full_recompute(arch: str) -> None:
    model = tiny(arch)
    ids = np.random.default_rng(7).integers(3, model.hp.n_vocab, 90).astype(np.int32)
    dec = Decoder(model, 128, matmul="f32")
    worst = 0.0

    def check(z: np.ndarray, upto: int) -> None:
        nonlocal worst
        ref = full_logits(model, ids[:upto])
        assert z.shape == ref.shape == (model.hp.n_vocab,) and z.dtype == np.float32
        worst = max(worst, float(np.abs(z - ref).max()))
        assert np.allclose(z, ref, rtol=0, atol=ATOL), (upto, float(np.abs(z - ref).max()))

    check(dec.eval(ids[:40]), 40)  # prefill
    for i in range(40, 70):  # steps, past the sliding window of 32
        check(dec.eval(ids[i:i + 1]), i + 1)
    assert dec.n_past == 70
    dec.truncate(50)  # forget 20 positions, then a second turn of 25 tokens in one pass
    assert dec.n_past == 50
    check(dec.eval(ids[50:75]), 75)
    for i in range(75, 90):
        check(dec.eval(ids[i:i + 1]), i + 1)
    dec.truncate(0)  # and from the start again
    check(dec.eval(ids[:10]), 10)
    assert worst > 0  # the two paths really are different computations


def test_the_adapter_reaches_the_logits() -> None:
    # what the cache test's adapter does at all: without it the logits differ far beyond ATOL
    with_ad, base = tiny("llama"), tiny("llama", adapter=False)
    ids = np.arange(5, 25, dtype=np.int32)
    a = Decoder(with_ad, 32, "f32").eval(ids)
    b = Decoder(base, 32, "f32").eval(ids)
    assert np.abs(a - b).max() > 100 * ATOL
    assert np.allclose(a, full_logits(with_ad, ids), rtol=0, atol=ATOL)


def test_kv_cache_size_follows_n_ctx() -> None:
    model = tiny("gemma3", adapter=False)
    hp = model.hp
    for n_ctx in (16, 200):
        dec = Decoder(model, n_ctx, "f32")
        assert dec.kv_bytes == 2 * hp.n_layer * n_ctx * hp.n_head_kv * hp.head_dim * 4
        assert dec.kv_bytes == KVCache.bytes_for(hp, n_ctx)
    # a cache larger than the memory available is refused before anything is allocated
    import psutil
    huge = 2 * psutil.virtual_memory().available // KVCache.bytes_for(hp, 1)
    with pytest.raises(GGTrainError, match="the KV cache would take .* of memory available; give a smaller -c"):
        Decoder(model, huge, "f32")


def test_a_full_context_is_refused() -> None:
    dec = Decoder(tiny("llama", adapter=False), 12, "f32")
    dec.eval(list(range(3, 13)))
    with pytest.raises(GGTrainError, match="context full"):
        dec.eval([5, 6, 7])
    assert dec.n_past == 10  # nothing was appended
    dec.eval([5, 6])  # exactly full is fine


class Scripted:
    """A 'sampler' that answers a fixed list, to drive the loop's stops."""

    def __init__(self, answers: list[int]) -> None:
        self.answers, self.calls = list(answers), 0

    def sample(self, logits: np.ndarray, history: object) -> int:
        self.calls += 1
        return self.answers.pop(0)


def test_generation_stops_at_eog_n_predict_and_a_full_context() -> None:
    model = tiny("qwen3", adapter=False)
    prompt = [10, 11, 12, 13]
    got: list[int] = []
    dec = Decoder(model, 64, "f32")
    st = generate_tokens(dec, Scripted([20, 21, 99, 22]), prompt, 10, {99}, got.append)
    assert got == [20, 21] and st.stopped_by == "eog" and st.gen_tokens == 2
    assert dec.n_past == len(prompt) + 2  # the stop token is not fed back
    assert st.prompt_tokens == 4 and st.eval_runs == 2

    got.clear()
    dec.truncate(0)
    st = generate_tokens(dec, Scripted([20, 21, 22, 23]), prompt, 3, {99}, got.append)
    assert got == [20, 21, 22] and st.stopped_by == "n_predict" and st.eval_runs == 2
    assert dec.n_past == len(prompt) + 2  # the last token is never evaluated, as in llama.cpp

    got.clear()
    dec = Decoder(model, 8, "f32")
    st = generate_tokens(dec, Scripted(list(range(30, 40))), prompt, -1, {99}, got.append)
    # 4 prompt positions + 4 fed tokens fill the 8; the 5th token, sampled from the last logits, ends it
    assert st.stopped_by == "ctx" and got == [30, 31, 32, 33, 34] and dec.n_past == 8

    with pytest.raises(GGTrainError, match="context holds 8"):
        generate_tokens(Decoder(model, 8, "f32"), Scripted([1]), list(range(3, 12)), 1, set(), got.append)


def test_greedy_generation_follows_the_argmax_of_a_full_recompute() -> None:
    # the loop with the real (greedy) sampler: each token is the argmax of the full forward's logits
    model = tiny("gemma2")
    prompt = [2, 40, 41, 42]
    got: list[int] = []
    st = generate_tokens(Decoder(model, 64, "f32"), Sampler(GREEDY), prompt, 12, set(), got.append)
    assert st.stopped_by == "n_predict" and len(got) == 12
    seq = list(prompt)
    for t in got:
        assert t == int(np.argmax(full_logits(model, np.array(seq))))
        seq.append(t)


@pytest.mark.skipif(not kernels.int8_available(), reason="this CPU has no AVX512-VNNI: the int8 path cannot run here")
@pytest.mark.parametrize("qt", INT8_TYPES, ids=lambda q: q.name)
def test_int8_decode_product_is_the_int8_product(qt: Q) -> None:
    # 1..8 tokens take the matrix-vector kernel: the same documented approximation as the tiled one
    # (activations per group to int8, weights exact), at f32 rounding; widths that are not a
    # multiple of 64 bytes exercise its tail
    rng = np.random.default_rng(int(qt))
    for n in ((256, 768) if qt in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS) else (96, 640)):
        w = make_weight(qt, 37, n, rng)
        for T in (1, 3, 8):
            x = rng.standard_normal((T, n), dtype=np.float32)
            assert rel_err(kernels.qmatmul_int8(x, w, qt), reference(x, w, qt)) < 1e-5, (n, T)


@pytest.mark.parametrize("n_swa, softcap", [(0, 0.0), (300, 30.0)])
@pytest.mark.parametrize("L, n", [(40, 1), (40, 7), (2100, 1), (2100, 5)])  # short: serial; long: parallel
def test_attention_over_the_cache_is_the_causal_attention(L: int, n: int, n_swa: int, softcap: float) -> None:
    # the last n queries over a cache of L positions = those rows of attention over all L at once
    from ggtrain.kernels.attention import attention_forward
    from ggtrain.kernels.kvattention import attention_cached

    rng = np.random.default_rng(L + n)
    q = rng.standard_normal((L, 4, 64), dtype=np.float32)
    k = rng.standard_normal((L, 2, 64), dtype=np.float32)
    v = rng.standard_normal((L, 2, 64), dtype=np.float32)
    full, _ = attention_forward(q, k, v, 0.125, softcap, n_swa)
    cache_k = np.zeros((L + 10, 2, 64), np.float32)
    cache_v = np.zeros((L + 10, 2, 64), np.float32)
    cache_k[:L], cache_v[:L] = k, v  # rows past L are never read
    cache_k[L:], cache_v[L:] = np.nan, np.nan
    got = attention_cached(np.ascontiguousarray(q[L - n:]), cache_k, cache_v, L - n, 0.125, softcap, n_swa)
    assert np.allclose(got, full[L - n:], rtol=0, atol=2e-5)
