"""The sampler chain against llama.cpp's own: llama-server's post-sampling probabilities (what its chain
leaves for the final draw: `n_probs` with `post_sampling_probs`) next to ggtrain's Sampler.distribution
for the same prompt tokens and flags, for prompts nobody here wrote (the opening words of texts in
/usr/share/common-licenses).

On F32 models (test-written, llama and qwen2) with llama.cpp's KV cache in f32 and flash attention off,
the two programs' logits agree to ~1e-5, so the chains can be compared tightly: the same candidate set
(a token may differ only if its logit is within CUT_EPS of a cut) and the same probabilities within
PROB_ABS + PROB_REL x p. (On a quantized model llama.cpp's int8 activations move logits by ~0.1, which
would hide a chain's error in the noise.)
"""

from __future__ import annotations

from pathlib import Path

import llamacpp
import numpy as np
import pytest
from tinymodels import tiny_model

from ggtrain.generate.decoder import Decoder
from ggtrain.generate.sampling import Sampler, SamplingParams, apply_repeat_penalty
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.transformer import Model
from ggtrain.text.tokenizer import Tokenizer

TEXTS = ["GPL-3", "Apache-2.0", "MPL-2.0"]
N_PROBS = 2000
CUT_EPS = 1e-4
PROB_ABS, PROB_REL = 1e-5, 1e-3
PARAMS = [
    SamplingParams(),  # llama.cpp's defaults
    SamplingParams(temp=0.0),  # greedy
    SamplingParams(temp=1.5, top_k=0, top_p=0.9, min_p=0.4),
    SamplingParams(temp=0.6, top_k=8, top_p=1.0, min_p=0.0),
    SamplingParams(temp=1.0, top_k=500, top_p=0.3, min_p=0.0),
    SamplingParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.3),  # min-p on unsorted candidates
    SamplingParams(temp=1.0, top_k=20, top_p=1.0, min_p=0.0, repeat_penalty=0.2, repeat_last_n=16),
    SamplingParams(temp=0.9, top_k=30, top_p=0.95, min_p=0.05, repeat_penalty=3.0, repeat_last_n=64),
]


def prompt_of(name: str, words: int) -> str:
    text = " ".join(Path("/usr/share/common-licenses", name).read_text(encoding="utf-8").split())
    return " ".join(text.split(" ")[:words])


def llamacpp_candidates(url: str, ids: list[int], p: SamplingParams) -> dict[int, float]:
    body = {"prompt": ids, "n_predict": 1, "n_probs": N_PROBS, "post_sampling_probs": True, "cache_prompt": False,
            "temperature": p.temp, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
            "repeat_penalty": p.repeat_penalty, "repeat_last_n": p.repeat_last_n, "seed": 1}
    (first,) = llamacpp.http_json(url + "/completion", body)["completion_probabilities"]
    return {c["id"]: c["prob"] for c in first["top_probs"]}


def near_a_cut(logits: np.ndarray, token: int, kept: dict[int, float], dropped_side: dict[int, float]) -> bool:
    """Whether `token` (in one set, not the other) has a logit within CUT_EPS of a kept token's logit
    at the edge of the other set: where 1e-5 of logit noise may put it on either side."""
    edge = [logits[t] for t in dropped_side]
    return bool(edge) and min(abs(logits[token] - e) for e in edge) < CUT_EPS


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_chain_leaves_what_llamacpps_leaves(arch: str):
    path = tiny_model(arch, "F32")
    mf = ModelFile(path)
    tok = Tokenizer.from_model_file(mf)
    dec = Decoder(Model(mf), 512, matmul="f32")
    compared = 0
    with llamacpp.server(path, "-c", "512", "-t", "2", "-np", "1", "--no-warmup", "-ctk", "f32", "-ctv", "f32",
                         "-fa", "off") as url:
        for name in TEXTS:
            ids = tok.encode(prompt_of(name, 24), add_special=True, parse_special=False)
            dec.truncate(0)
            logits = dec.eval(ids)
            for p in PARAMS:
                where = f"{arch} {name} {p}"
                theirs = llamacpp_candidates(url, ids, p)
                assert 0 < len(theirs) < N_PROBS, (where, len(theirs))  # the whole set came back
                got_ids, got_p = Sampler(p).distribution(logits, ids)
                ours = dict(zip(got_ids.tolist(), got_p.tolist()))
                penalised = apply_repeat_penalty(logits, ids, p.repeat_penalty, p.repeat_last_n)
                for t in set(ours) - set(theirs):
                    assert near_a_cut(penalised, t, ours, theirs), (where, "only ours", t)
                for t in set(theirs) - set(ours):
                    assert near_a_cut(penalised, t, theirs, ours), (where, "only llama.cpp's", t)
                both = set(ours) & set(theirs)
                so, st = sum(ours[t] for t in both), sum(theirs[t] for t in both)
                for t in both:
                    want = theirs[t] / st
                    assert abs(ours[t] / so - want) <= PROB_ABS + PROB_REL * want, (where, t, ours[t], theirs[t])
                compared += 1
                if p.repeat_penalty < 1:  # a penalty below 1 favours repeats: the prompt's tokens lead
                    assert set(sorted(ours, key=ours.get)[-5:]) & set(ids[-p.repeat_last_n:])
    assert compared == len(TEXTS) * len(PARAMS)
