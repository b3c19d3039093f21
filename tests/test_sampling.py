"""Sampling: llama.cpp's default chain (penalties, top-k, top-p, min-p, temperature, draw), each step
against a float64 sorted-list reference written here, the defaults against llama.cpp's own header,
seeded reproducibility, greedy = argmax, and no Python loop over a 262k vocabulary."""

from __future__ import annotations

import math
import re
import time

import llamacpp
import numpy as np
import pytest

from ggtrain.errors import GGTrainError
from ggtrain.generate.sampling import GREEDY, Sampler, SamplingParams, apply_repeat_penalty, candidates

OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


# -- the reference: llama.cpp's samplers as plain lists of (logit, id), in float64 ---------------------
def ref_penalty(logits: list[float], history: list[int], penalty: float, last_n: int) -> list[float]:
    out = list(logits)
    if last_n == 0 or penalty == 1.0:
        return out
    for t in set(history[-last_n:]):
        out[t] = out[t] * penalty if out[t] <= 0 else out[t] / penalty
    return out


def ref_softmax(cands: list[tuple[float, int]]) -> list[float]:
    m = max(v for v, _ in cands)
    e = [math.exp(v - m) for v, _ in cands]
    s = sum(e)
    return [x / s for x in e]


# float32 sums (ours, llama.cpp's) and float64 sums (the reference) may put top-p's cut on either side
# of a token whose cumulative probability is this close to top_p
CUT_TOLERANCE = 1e-4


def ref_chain(logits: list[float], history: list[int], p: SamplingParams,
              near_cut: set[int] | None = None) -> dict[int, float]:
    """token id -> probability of being drawn; tokens at top-p's cut within CUT_TOLERANCE go into near_cut."""
    x = ref_penalty(logits, history, p.repeat_penalty, p.repeat_last_n)
    cands = sorted(((v, i) for i, v in enumerate(x)), key=lambda c: (-c[0], c[1]))
    if p.top_k > 0:
        cands = cands[:p.top_k]
    if p.top_p < 1.0:
        cum, keep = 0.0, len(cands)
        for j, pr in enumerate(ref_softmax(cands)):
            if near_cut is not None and abs(cum - p.top_p) < CUT_TOLERANCE and j:
                near_cut.add(cands[j][1])
            cum += pr
            if cum >= p.top_p:
                keep = j + 1
                break
        cands = cands[:keep]
    if p.min_p > 0.0:
        floor = cands[0][0] + math.log(p.min_p)
        cands = [c for c in cands if c[0] >= floor]
    if p.temp <= 0:
        return {cands[0][1]: 1.0}
    scaled = [(v / p.temp, i) for v, i in cands]
    return {i: pr for (_, i), pr in zip(scaled, ref_softmax(scaled))}


def logits_of(n: int, seed: int, spread: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * spread).astype(np.float32)


def ours(logits: np.ndarray, history: list[int], p: SamplingParams) -> dict[int, float]:
    ids, probs = Sampler(p).distribution(logits, history)
    assert len(set(ids.tolist())) == len(ids)
    return dict(zip(ids.tolist(), probs.tolist()))


def assert_same_distribution(got: dict[int, float], want: dict[int, float], near_cut: set[int] = frozenset()) -> None:
    """The same tokens with the same probabilities; a token in near_cut may be in one and not the other
    (then both are compared renormalised over the tokens they share)."""
    assert set(got) ^ set(want) <= near_cut, (set(got) ^ set(want), near_cut)
    both = set(got) & set(want)
    sg, sw = sum(got[t] for t in both), sum(want[t] for t in both)
    for t in both:
        assert got[t] / sg == pytest.approx(want[t] / sw, rel=1e-5, abs=1e-7), t


def check_chain(x: np.ndarray, history: list[int], p: SamplingParams) -> dict[int, float]:
    near: set[int] = set()
    want = ref_chain(x.tolist(), history, p, near)
    got = ours(x, history, p)
    assert_same_distribution(got, want, near)
    return got


# -- defaults --------------------------------------------------------------------------------------
def test_defaults_are_llamacpps_own():
    header = (llamacpp.source_dir() / "common" / "common.h").read_text()
    block = header[header.index("struct common_params_sampling {"):]
    block = block[:block.index("\n};")]

    def default(name: str) -> float:
        m = re.search(rf"\b{name}\s*=\s*(-?[0-9.]+)f?\s*;", block)
        assert m, name
        return float(m.group(1))

    d = SamplingParams()
    assert d.temp == pytest.approx(default("temp"))
    assert d.top_k == default("top_k")
    assert d.top_p == pytest.approx(default("top_p"))
    assert d.min_p == pytest.approx(default("min_p"))
    assert d.repeat_penalty == pytest.approx(default("penalty_repeat"))
    assert d.repeat_last_n == default("penalty_last_n")
    assert "uint32_t seed = LLAMA_DEFAULT_SEED" in block and d.seed == -1  # -1 as the flag reads 0xFFFFFFFF
    # the order the chain runs in: the samplers this module implements come in llama.cpp's order
    order = re.findall(r"COMMON_SAMPLER_TYPE_(\w+),", block[block.index("samplers = {"):])
    assert order == ["PENALTIES", "DRY", "TOP_N_SIGMA", "TOP_K", "TYPICAL_P", "TOP_P", "MIN_P", "XTC",
                     "TEMPERATURE"]
    # the ones left out are off by default, so llama.cpp's default chain skips them too
    assert default("dry_multiplier") == 0.0 and default("top_n_sigma") == -1.0
    assert default("typ_p") == 1.0 and default("xtc_probability") == 0.0


# -- each sampler alone, then the whole chain, against the reference --------------------------------
@pytest.mark.parametrize("k", [1, 5, 40, 999, 1000, 5000])
def test_top_k(k):
    x = logits_of(1000, 1)
    p = SamplingParams(**{**OFF, "top_k": k}, temp=1.0)
    ids, vals = candidates(x, p)
    want = np.argsort(-x.astype(np.float64), kind="stable")[:k]
    assert ids.tolist() == want.tolist()  # the k largest, sorted, as llama.cpp's partial sort leaves them
    assert np.all(np.diff(vals) <= 0)
    check_chain(x, [], p)


@pytest.mark.parametrize("top_p", [0.0, 0.1, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("top_k", [0, 40])
def test_top_p(top_p, top_k):
    x = logits_of(2000, 2)
    p = SamplingParams(**{**OFF, "top_p": top_p, "top_k": top_k}, temp=1.0)
    got = check_chain(x, [], p)
    if top_p == 0.0:
        assert list(got) == [int(np.argmax(x))]


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("top_k", [0, 40])
def test_min_p(min_p, top_k):
    x = logits_of(3000, 3)
    p = SamplingParams(**{**OFF, "min_p": min_p, "top_k": top_k}, temp=1.0)
    got = check_chain(x, [], p)
    mx = x.max()
    assert all(x[t] >= mx + np.log(np.float32(min_p)) for t in got)


@pytest.mark.parametrize("temp", [0.1, 0.5, 0.8, 1.0, 2.5])
def test_temperature(temp):
    x = logits_of(500, 4)
    p = SamplingParams(**OFF, temp=temp)
    check_chain(x, [], p)


@pytest.mark.parametrize("seed", range(6))
def test_default_chain_and_combinations(seed):
    rng = np.random.default_rng(100 + seed)
    x = logits_of(4096, 200 + seed, spread=float(rng.uniform(1, 6)))
    history = rng.integers(0, 4096, 300).tolist()
    params = [SamplingParams(),
              SamplingParams(repeat_penalty=1.3),
              SamplingParams(temp=1.7, top_k=0, top_p=0.8, min_p=0.02, repeat_penalty=0.8, repeat_last_n=17),
              SamplingParams(temp=0.3, top_k=400, top_p=0.99, min_p=0.0, repeat_penalty=2.0, repeat_last_n=0)]
    for p in params:
        check_chain(x, history, p)


# -- the repeat penalty -----------------------------------------------------------------------------
def test_repeat_penalty_divides_positive_multiplies_negative_once_per_token():
    x = np.array([2.0, -2.0, 0.0, 4.0, -1.0, 3.0], dtype=np.float32)
    history = [5, 0, 1, 1, 1, 2, 4]  # token 5 is beyond the last 6; 1 occurs three times
    y = apply_repeat_penalty(x, history, 2.0, 6)
    assert y.tolist() == [1.0, -4.0, 0.0, 4.0, -2.0, 3.0]
    assert x.tolist() == [2.0, -2.0, 0.0, 4.0, -1.0, 3.0]  # the caller's logits are not touched
    assert apply_repeat_penalty(x, history, 2.0, 0) is x  # 0: off
    assert apply_repeat_penalty(x, history, 1.0, 64) is x  # 1.0: off
    assert apply_repeat_penalty(x, history, 2.0, 100)[5] == 1.5  # the whole history when it is short
    # a penalty below 1 favours repeats (llama.cpp takes any finite value above 0)
    assert apply_repeat_penalty(x, [0, 1], 0.5, 64)[:2].tolist() == [4.0, -1.0]


def test_repeat_penalty_changes_the_greedy_choice():
    x = np.array([1.0, 5.0, 4.0], dtype=np.float32)
    assert Sampler(GREEDY).sample(x, [1]) == 1
    assert Sampler(SamplingParams(temp=0, repeat_penalty=1.5)).sample(x, [1]) == 2
    assert Sampler(SamplingParams(temp=0, repeat_penalty=1.5, repeat_last_n=1)).sample(x, [1, 0]) == 1


# -- greedy and seeds -------------------------------------------------------------------------------
@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_temp_zero_is_argmax(temp):
    s = Sampler(SamplingParams(temp=temp))
    for i in range(20):
        x = logits_of(262144, 300 + i)
        assert s.sample(x, []) == int(np.argmax(x))
    tie = np.array([1.0, 3.0, 3.0, 2.0], dtype=np.float32)
    assert s.sample(tie, []) == 1  # the first of equal logits, as llama.cpp's temp-0 scan keeps


def draws(params: SamplingParams, n: int = 200, vocab: int = 3000) -> list[int]:
    s = Sampler(params)
    out: list[int] = []
    for i in range(n):
        out.append(s.sample(logits_of(vocab, i, spread=1.5), out))
    return out


def test_same_seed_same_tokens_other_seed_other_tokens():
    a = draws(SamplingParams(seed=1234))
    assert a == draws(SamplingParams(seed=1234))
    assert a != draws(SamplingParams(seed=1235))
    assert len(set(a)) > 50  # it did sample, not pick the top each time


def test_random_seed_is_reported_and_repeatable():
    s = Sampler(SamplingParams())
    assert 0 <= s.seed < 2**32
    assert Sampler(SamplingParams()).seed != s.seed
    assert draws(SamplingParams(seed=s.seed)) == draws(SamplingParams(seed=s.seed))


def test_draws_follow_the_distribution():
    x = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], dtype=np.float32))
    p = SamplingParams(**OFF, temp=1.0, seed=7)
    s = Sampler(p)
    n = 40000
    counts = np.bincount([s.sample(x, []) for _ in range(n)], minlength=5)
    want = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
    sigma = np.sqrt(n * want * (1 - want))
    assert np.all(np.abs(counts - n * want) < 5 * sigma), counts


def test_bad_params_are_refused_clearly():
    for kw, flag in [({"repeat_penalty": 0.0}, "--repeat-penalty"), ({"repeat_penalty": float("nan")}, "--repeat-penalty"),
                     ({"repeat_last_n": -1}, "--repeat-last-n"), ({"seed": -2}, "--seed"), ({"seed": 2**32}, "--seed")]:
        with pytest.raises(GGTrainError, match=flag):
            SamplingParams(**kw)


def test_a_262k_vocabulary_is_sampled_in_milliseconds():
    x = logits_of(262144, 9)
    history = list(range(0, 262144, 997))
    for p in (SamplingParams(seed=1), SamplingParams(top_k=0, seed=1), SamplingParams(top_k=0, top_p=1.0, seed=1)):
        s = Sampler(p)
        s.sample(x, history)
        t0 = time.perf_counter()
        for _ in range(10):
            s.sample(x, history)
        per = (time.perf_counter() - t0) / 10
        # a Python loop over the vocabulary takes ~100 ms; a full argsort (top-k off) ~20 ms
        assert per < 0.06, (p, per)
