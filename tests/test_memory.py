"""ggtrain.train.memory: the step-memory estimate's behaviour, micro-batch choice and refusal, the default
limit, size parsing, and the RSS monitor seeing a real allocation."""

import itertools
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from ggtrain.errors import GGTrainError
from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
from ggtrain.train.memory import (
    SAFETY_FRACTION,
    GiB,
    MemoryMonitor,
    MiB,
    choose_keep_ffn,
    choose_micro_batch,
    default_mem_limit,
    estimate_step_memory,
    format_bytes,
    lora_param_count,
    memory_breakdown,
    parse_size,
    smaller_micro_batch,
)

# Gemma 3 270M's dims (the default model)
GEMMA = SimpleNamespace(n_embd=640, n_layer=18, n_head=4, n_head_kv=1, head_dim=256, head_dim_v=256, n_ff=2048,
                        n_vocab=262144, has_qk_norm=True, has_post_norms=True)
FILE = 253 * MiB
CFG = LoraConfig.make(r=8, alpha=16)


def est(ctx=256, mb=1, ck=True, cfg=CFG, hp=GEMMA, file=FILE, **kw):
    return estimate_step_memory(hp, cfg, ctx, mb, ck, file, threads=2, **kw)


def test_monotonic_in_ctx_and_micro_batch():
    for ck in (True, False):
        by_ctx = [est(ctx=c, ck=ck) for c in (32, 64, 128, 256, 512, 1024, 2048)]
        assert all(a < b for a, b in itertools.pairwise(by_ctx))
        by_mb = [est(mb=m, ck=ck) for m in (1, 2, 3, 4, 8, 16)]
        assert all(a < b for a, b in itertools.pairwise(by_mb))
    # T = ctx · micro_batch is what matters
    assert est(ctx=256, mb=2) == est(ctx=512, mb=1)


def test_checkpointing_reduces_and_parts_add_up():
    for ctx in (128, 512, 2048):
        with_ck, without = est(ctx=ctx, ck=True), est(ctx=ctx, ck=False)
        assert with_ck < without
    # activations dominate at a long context: checkpointing saves most of them
    a = memory_breakdown(GEMMA, CFG, 2048, 4, True, FILE, threads=2)
    b = memory_breakdown(GEMMA, CFG, 2048, 4, False, FILE, threads=2)
    act_ck = a["activations (block checkpoints + one block recomputed)"]
    act_full = b["activations (all blocks)"]
    assert act_full > 5 * act_ck
    assert a["total"] == sum(v for k, v in a.items() if k != "total")
    # the weights count as the file's size, one for one (plus the proportional margin)
    assert est(file=FILE + GiB) - est() == pytest.approx((1 + SAFETY_FRACTION) * GiB, rel=1e-6)
    # more LoRA parameters, more memory
    assert est(cfg=LoraConfig.make(r=64)) > est(cfg=LoraConfig.make(r=8))
    # dropout keeps the dropped inputs and masks
    assert est(cfg=LoraConfig.make(r=8, dropout=0.1)) > est(cfg=LoraConfig.make(r=8))


def test_lora_param_count_matches_the_real_layout():
    hp = SimpleNamespace(n_embd=64, n_layer=3, n_head=4, n_head_kv=2, head_dim=16, head_dim_v=16, n_ff=96,
                         n_vocab=100)
    shapes = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
              "ffn_gate": (96, 64), "ffn_up": (96, 64), "ffn_down": (64, 96)}
    tensors = {f"blk.{i}.{k}.weight": SimpleNamespace(shape=s) for i in range(3) for k, s in shapes.items()}
    tensors["output.weight"] = SimpleNamespace(shape=(100, 64))
    cfg = LoraConfig.make(r=4, ranks={"ffn_down": 2, "attn_k": 0, "output": 3})
    lw = LoraWeights.init(cfg, target_shapes(tensors, cfg, 3))
    assert lora_param_count(hp, cfg) == lw.n_params


def test_choose_micro_batch():
    huge = 1 << 50
    assert choose_micro_batch(8, huge, GEMMA, CFG, 256, True, FILE, threads=2) == 8
    # a limit between what micro-batch 2 and 4 need -> 2 (a divisor of 8)
    lim = (est(mb=2) + est(mb=4)) // 2
    assert choose_micro_batch(8, lim, GEMMA, CFG, 256, True, FILE, threads=2) == 2
    # batch 6: 4 is not a divisor, so even with room for 4 the choice is 3
    lim = est(mb=4) + 1
    assert choose_micro_batch(6, lim, GEMMA, CFG, 256, True, FILE, threads=2) == 3
    # a prime batch falls back to 1 when it does not fit whole
    assert choose_micro_batch(7, est(mb=6), GEMMA, CFG, 256, True, FILE, threads=2) == 1
    assert choose_micro_batch(1, est(mb=1), GEMMA, CFG, 256, True, FILE, threads=2) == 1
    with pytest.raises(GGTrainError, match="--batch"):
        choose_micro_batch(0, huge, GEMMA, CFG, 256, True, FILE)


def test_kept_ffn_outputs_cost_two_ffn_arrays_a_layer_and_auto_keeps_them_when_they_fit():
    lean = memory_breakdown(GEMMA, CFG, 256, 2, True, FILE, threads=2)
    kept = memory_breakdown(GEMMA, CFG, 256, 2, True, FILE, threads=2, keep_ffn=True)
    extra = GEMMA.n_layer * 2 * 512 * GEMMA.n_ff * 4  # gate and up outputs, (T, n_ff) f32 each
    assert kept[ACT_CK] - lean[ACT_CK] == extra
    assert memory_breakdown(GEMMA, CFG, 256, 2, False, FILE, threads=2, keep_ffn=True) == \
        memory_breakdown(GEMMA, CFG, 256, 2, False, FILE, threads=2)  # nothing to keep without checkpoints
    args = (GEMMA, CFG, 256, 2, True, FILE)
    assert choose_keep_ffn("auto", kept["total"], *args, threads=2)
    assert not choose_keep_ffn("auto", kept["total"] - 1, *args, threads=2)
    assert choose_keep_ffn("auto", 0, *args, threads=2)  # no limit
    assert choose_keep_ffn("on", lean["total"], *args, threads=2)
    assert not choose_keep_ffn("off", 1 << 50, *args, threads=2)
    assert not choose_keep_ffn("on", 1 << 50, GEMMA, CFG, 256, 2, False, FILE)  # no checkpointing
    with pytest.raises(ValueError, match="checkpoint_ffn"):
        choose_keep_ffn("sometimes", 0, *args)


def test_smaller_micro_batch():
    assert smaller_micro_batch(8, 8) == 4
    assert smaller_micro_batch(12, 6) == 4
    assert smaller_micro_batch(12, 5) == 4  # from a non-divisor too
    assert smaller_micro_batch(7, 7) == 1
    assert smaller_micro_batch(8, 1) is None


def test_refusal_names_the_numbers():
    need = est(ctx=512, mb=1, ck=False)
    limit = need - 10 * MiB
    with pytest.raises(GGTrainError) as ei:
        choose_micro_batch(4, limit, GEMMA, CFG, 512, False, FILE, threads=2)
    msg = str(ei.value)
    assert f"--mem-limit {format_bytes(limit)} is too small" in msg
    assert "ctx 512, micro-batch 1" in msg and f"about {format_bytes(need)}" in msg
    assert f"weights (mmap'd model file) {format_bytes(FILE)}" in msg
    assert "use --use-checkpointing" in msg and "lower --ctx" in msg
    with pytest.raises(GGTrainError) as ei:
        choose_micro_batch(4, 100 * MiB, GEMMA, CFG, 512, True, FILE, threads=2)
    assert "use --use-checkpointing" not in str(ei.value)


def test_default_mem_limit():
    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    lim = default_mem_limit()
    assert rss < lim <= 0.9 * vm.total
    assert default_mem_limit(0.1) < lim


def test_parse_and_format_sizes():
    assert parse_size("8G") == 8 * GiB
    assert parse_size("512M") == 512 * MiB
    assert parse_size("1.5GiB") == int(1.5 * GiB)
    assert parse_size("2000000") == 2000000
    assert parse_size("64kb") == 64 * 1024
    assert parse_size(123) == 123
    with pytest.raises(GGTrainError, match="cannot read memory size 'lots'"):
        parse_size("lots")
    assert format_bytes(1536 * MiB) == "1.50 GiB"
    assert format_bytes(3 * MiB) == "3.00 MiB"
    assert format_bytes(12) == "12 B"


def test_monitor_sees_a_real_allocation():
    before = psutil.Process().memory_info().rss
    with MemoryMonitor(limit=before + 150 * MiB, interval=0.01) as mon:
        assert not mon.near_limit()
        big = np.ones(256 * MiB // 8)  # touched pages: RSS really grows by 256 MiB
        time.sleep(0.1)
        assert mon.peak >= before + 200 * MiB
        assert mon.near_limit()
        del big
        time.sleep(0.05)
        mon.reset_window()
        assert mon.window_peak < mon.peak
        assert not mon.near_limit()
    assert mon._thread is None  # stopped and joined
    assert MemoryMonitor().near_limit() is False  # no limit, never near it


ACT_CK, ACT_FULL = "activations (block checkpoints + one block recomputed)", "activations (all blocks)"


def test_estimate_is_computed_from_the_declared_block_cache(monkeypatch):
    """An array added to BlockCache's declaration is in the estimate at once: its bytes once per block
    kept (one under checkpointing, every layer without), and only for models with its option."""
    from dataclasses import field, make_dataclass

    from ggtrain.model.saved import BlockCache, saved
    from ggtrain.train import memory

    ctx = 256
    plain = SimpleNamespace(**{**vars(GEMMA), "has_qk_norm": False})

    def acts(hp):
        return (memory_breakdown(hp, CFG, ctx, 1, True, FILE, threads=2)[ACT_CK],
                memory_breakdown(hp, CFG, ctx, 1, False, FILE, threads=2)[ACT_FULL])

    before, before_plain = acts(GEMMA), acts(plain)
    wider = make_dataclass("Wider", [("extra", np.ndarray, field(metadata=saved("T", "ff")))],
                           bases=(BlockCache,), kw_only=True)
    monkeypatch.setattr(memory, "BlockCache", wider)
    ck, full = acts(GEMMA)
    assert ck - before[0] == ctx * GEMMA.n_ff * 4
    assert full - before[1] == GEMMA.n_layer * ctx * GEMMA.n_ff * 4
    normed = make_dataclass("Normed", [("extra", np.ndarray, field(metadata=saved("T", "d", when="has_qk_norm")))],
                            bases=(BlockCache,), kw_only=True)
    monkeypatch.setattr(memory, "BlockCache", normed)
    assert acts(GEMMA)[0] - before[0] == ctx * GEMMA.n_embd * 4
    assert acts(plain) == before_plain


def _buffer(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_block_cache_holds_what_it_declares(arch):
    """The arrays block_forward really keeps have their declared shapes, and the memory they own adds
    up to BlockCache.nbytes (llama: no q/k or post norms; qwen3: q/k norms; gemma3: both; dropout on
    some projections only)."""
    from tinymodels import tiny_model

    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.saved import BlockCache, block_dims, check_shapes, projection_shapes
    from ggtrain.model.transformer import Batch, Model

    mf = ModelFile(tiny_model(arch, "Q8_0"))
    model = Model(mf)
    cfg = LoraConfig.make(r=4, dropout=0.1, dropouts={"attn_k": 0.0, "ffn_up": 0.0}, ranks={"attn_v": 2})
    model = model.with_trainable(LoraWeights.init(cfg, target_shapes(mf.tensors, cfg, model.hp.n_layer)))
    T = 24
    ids = np.random.default_rng(0).integers(5, 500, T + 1).astype(np.int32)
    _, state = model.forward(Batch.from_rows(ids[None, :-1], ids[None, 1:], np.ones((1, T))), train=True,
                             checkpointing=False, step_seed=3)
    c = state.caches[1]
    assert isinstance(c, BlockCache) and set(c.lora) == set(cfg.targets)
    check_shapes(c, block_dims(model.hp, T))
    shapes = projection_shapes(model.hp)
    for t, lc in c.lora.items():
        check_shapes(lc, {"T": T, "in": shapes[t][1], "r": cfg.targets[t].rank})
        assert (lc.mask is not None) == (cfg.targets[t].dropout > 0)
    assert (c.q_pre is not None) == model.hp.has_qk_norm and (c.f_pre is not None) == model.hp.has_post_norms
    arrays = [getattr(c, f) for f in vars(c) if isinstance(getattr(c, f), np.ndarray)]
    arrays += [a for lc in c.lora.values() for a in vars(lc).values() if isinstance(a, np.ndarray)]
    owned = {id(b): b.nbytes for b in map(_buffer, arrays) if b is not _buffer(c.x)}
    assert sum(owned.values()) == BlockCache.nbytes(model.hp, cfg.targets, T)


@pytest.mark.parametrize("arch,keep_ffn", [("llama", False), ("gemma3", False), ("llama", True), ("gemma3", True)])
def test_block_checkpoint_holds_what_it_declares(arch, keep_ffn):
    """Under checkpointing a block keeps its BlockCheckpoint: the input and the attn_output output,
    plus the ffn_down output where post-norms read it (gemma3), plus with keep_ffn the ffn_gate and
    ffn_up outputs, at the declared shapes and bytes; the backward of those checkpoints gives the
    very gradients of the run that kept everything."""
    from tinymodels import tiny_model

    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.saved import BlockCheckpoint, block_dims, check_shapes
    from ggtrain.model.transformer import Batch, Model

    mf = ModelFile(tiny_model(arch, "Q8_0"))
    cfg = LoraConfig.make(r=4, dropout=0.1, dropouts={"ffn_down": 0.0})
    model = Model(mf)
    model = model.with_trainable(LoraWeights.init(cfg, target_shapes(mf.tensors, cfg, model.hp.n_layer), seed=1))
    T = 24
    ids = np.random.default_rng(0).integers(5, 500, T + 1).astype(np.int32)
    batch = Batch.from_rows(ids[None, :-1], ids[None, 1:], np.ones((1, T)))
    grads = []
    for ck in (True, False):
        loss, state = model.forward(batch, train=True, checkpointing=ck, step_seed=3, keep_ffn=keep_ffn)
        if ck:
            c = state.caches[1]
            assert isinstance(c, BlockCheckpoint) and (c.f is not None) == model.hp.has_post_norms
            assert (c.g is not None) == (c.u is not None) == keep_ffn
            check_shapes(c, block_dims(model.hp, T))
            owned = {id(_buffer(a)): _buffer(a).nbytes for a in (c.x, c.o, c.f, c.g, c.u) if a is not None}
            assert sum(owned.values()) == BlockCheckpoint.nbytes(model.hp, T, keep_ffn)
        g = model.trainable.zeros_like()
        model.backward(state, g)
        grads.append((loss, g.flat.copy()))
    assert grads[0][0] == grads[1][0]
    np.testing.assert_array_equal(grads[0][1], grads[1][1])
