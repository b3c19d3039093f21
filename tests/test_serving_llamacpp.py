"""llama.cpp proves the serving path (issue 14, point 3): ggtrain's adapters in llama.cpp's own serving
tools, and llama.cpp's numbers equal to ggtrain's with the same adapters and scales.

- `--lora A` / `--lora-scaled A:S` (S positive and negative): the next-token distribution llama.cpp
  computes (tests/c/llama_logits.cpp, which applies adapters with the same library call as the
  tools) against ggtrain's, and `llama-completion`'s greedy continuation (`--temp 0 -n 8`) against
  ggtrain's greedy choice at every step (ggtrain has no KV-cache decoding yet: one causal forward
  pass over prompt + continuation gives each step's distribution, as a forward of that prefix would).
- `llama-server` with two adapters (one trained by `ggtrain finetune`, one with a LoRA on the output
  head): `--lora-init-without-apply`, GET/POST /lora-adapters, the per-request `lora` field; for
  every setting the server's top-k log-probs against ggtrain's.

"Equal" means: top-1 identical outside near-ties, top-k log-probs within a tolerance, and nearer to
ggtrain's distribution for the claimed adapters and scales than to any other setting tried (a wrong
scale, a wrong sign or an ignored adapter lands next to one of those). On F32 files both sides
compute in f32; on the Q4_K_M llama.cpp quantizes activations to 8 bits inside its matmuls, which
moves Gemma's log-probs by up to ~1.5 (its own noise, not the adapter's), so there the adapters are
made strong enough to stand far above it, and llama.cpp's F32 dequantization of the same file gives
the tight comparison on the real model.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import llamacpp
import numpy as np
import psutil
import pytest
from llamacpp_logits import llama_logits
from loras import random_lora
from test_model_llamacpp import dequantized_f32
from tinymodels import tiny_model

from ggtrain.adapters.gguf_lora import read_gguf_adapter, write_gguf_adapter
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig
from ggtrain.model.transformer import Adapter, Batch, Model
from ggtrain.text.tokenizer import Tokenizer

Setting = tuple[tuple[Path, float], ...]  # (adapter, scale) pairs; () is the base model
TOP_K = 10
N_PREDICT = 8
# Largest top-k log-prob difference accepted, and the near-tie window for top-1 and greedy steps:
# f32 on both sides (measured: up to 0.01, with llama.cpp's f16 K/V cache in the tools) /
# llama.cpp's 8-bit activations on the Q4_K_M (measured: up to 0.52 on this prompt, ~1.3 on others).
TOL = {"f32": 0.03, "q4": 1.5}
NOISE = {"f32": 0.02, "q4": 1.5}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Ggtrain:
    """ggtrain's side: a base model with the adapters of a setting attached as inference adapters,
    the way `ggtrain perplexity --lora A:S` attaches them."""

    def __init__(self, path: Path):
        self.mf = ModelFile(path)
        self.model = Model(self.mf)  # f32 products: the file's exact math
        self.tok = Tokenizer.from_model_file(self.mf)

    def use(self, setting: Setting) -> None:
        self.model.adapters = [Adapter(read_gguf_adapter(p, base=self.mf, scale=s)[0])
                               for p, s in setting if s != 0]

    def logprobs(self, ids: np.ndarray, setting: Setting, n_last: int = 1) -> np.ndarray:
        """(n_last, n_vocab) next-token log-probs at the last n_last positions of ids."""
        self.use(setting)
        ids = np.asarray(ids, dtype=np.int32)
        batch = Batch.from_rows(ids[None], np.zeros((1, len(ids))), np.zeros((1, len(ids))))
        return log_softmax(self.model.logits(batch, np.arange(len(ids) - n_last, len(ids))))

    def next_token_rows(self, seq: np.ndarray, n_gen: int, setting: Setting) -> np.ndarray:
        """(n_gen, n_vocab) log-probs from which each of the last n_gen tokens of seq was chosen: one
        causal forward pass, whose row i is what a forward pass of seq[:i + 1] alone gives, so a
        greedy decoder's every step is checked without a KV cache."""
        return self.logprobs(np.asarray(seq[:-1]), setting, n_last=n_gen)


def label(setting: Setting) -> str:
    return " + ".join(f"{p.stem}@{s:g}" for p, s in setting) or "base"


def topk_diff(ref_ids: np.ndarray, ref_lp: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """|log p| differences on llama.cpp's top-k tokens (ids, log-probs per row)."""
    return np.abs(np.take_along_axis(ours, ref_ids, axis=-1) - ref_lp)


def topk_of(lp: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(-lp, axis=-1)[..., :k]
    return ids, np.take_along_axis(lp, ids, axis=-1)


def assert_top1(ref_ids: np.ndarray, ours: np.ndarray, noise: float) -> None:
    """llama.cpp's most likely token is ours, or (a near-tie) within `noise` of our best."""
    for r, o in zip(np.atleast_2d(ref_ids), np.atleast_2d(ours)):
        if int(r[0]) != int(o.argmax()):
            lead = o.max() - o[r[0]]
            assert lead < noise, f"top-1 differs: llama.cpp {r[0]}, ggtrain {o.argmax()} (leads by {lead:.4f})"
            print(f"  near-tie: llama.cpp {r[0]}, ggtrain {o.argmax()}, lead {lead:.4f}")


def assert_matches(what: str, ref_ids: np.ndarray, ref_lp: np.ndarray, claimed: Setting,
                   ours: dict[Setting, np.ndarray], tol: float, noise: float) -> None:
    """llama.cpp's top-k (ids, log-probs) under `claimed` equals ggtrain's under `claimed`: the max
    difference within tol, the mean one far smaller than from ggtrain's under any other setting in
    `ours` (the mean: the 8-bit noise of a quantized model averages out, a wrong scale does not)."""
    diffs = {s: topk_diff(ref_ids, ref_lp, lp) for s, lp in ours.items()}
    worst, mean = float(diffs[claimed].max()), float(diffs[claimed].mean())
    other, nearest = min((float(d.mean()), label(s)) for s, d in diffs.items() if s != claimed)
    print(f"{what} [{label(claimed)}]: top-{ref_ids.shape[-1]} log-probs differ by {worst:.5f} at most, "
          f"{mean:.5f} on average; ggtrain's with {nearest}, the nearest other setting, by {other:.4f} on average")
    assert worst < tol, f"{what} [{label(claimed)}]: llama.cpp differs from ggtrain by {worst:.4f} (tolerance {tol})"
    assert 3 * mean < other, (f"{what} [{label(claimed)}]: llama.cpp's distribution is {mean:.4f} from ggtrain's "
                              f"with these adapters but only {other:.4f} from ggtrain's with {nearest}")
    assert_top1(ref_ids, ours[claimed], noise)


# -- models and adapters ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tiny F32 llama, an adapter `ggtrain finetune` trained on it, a random adapter with a LoRA on
    the output head as well, which training cannot make yet)."""
    model = tiny_model("llama", "F32")  # llama keeps a separate output.weight
    out = tmp_path_factory.mktemp("serving-tiny")
    run = subprocess.run([sys.executable, "-m", "ggtrain.cli.main", "finetune", "-m", str(model),
                          "--train-data", "/usr/share/common-licenses/GPL-3", "--format", "text",
                          "--outdir", str(out), "--lora-out", "trained.gguf", "-c", "64", "-b", "2",
                          "--adam-iter", "4", "--learning-rate", "0.01", "--warmup", "0", "--lora-r", "4",
                          "--save-every", "0", "-t", "2", "--seed", "1"],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    trained = out / "trained.gguf"
    mf = ModelFile(model)
    n_layer = int(mf.metadata["llama.block_count"])
    cfg = LoraConfig.make(r=4, alpha=8, targets=("attn_v", "ffn_up", "output"))
    head = write_gguf_adapter(out / "with-head.gguf", random_lora(mf, cfg, n_layer, seed=2, b_std=0.1), mf)
    return model, trained, head


@pytest.fixture(scope="module")
def gemma_adapter(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-looking adapter on all 7 projections of Gemma 3 270M, strong enough that its
    effect stands far above llama.cpp's 8-bit noise on the Q4_K_M."""
    mf = ModelFile(gemma_path)
    cfg = LoraConfig.make(r=8, alpha=16)
    lora = random_lora(mf, cfg, int(mf.metadata["gemma3.block_count"]), seed=1, b_std=0.04)
    return write_gguf_adapter(tmp_path_factory.mktemp("serving-gemma") / "gemma-lora.gguf", lora, mf)


def prompt_ids(tok: Tokenizer, n: int) -> np.ndarray:
    with open("/usr/share/common-licenses/GPL-3", encoding="utf-8") as f:
        return np.asarray(tok.encode(f.read()[:1000]), dtype=np.int32)[:n]


# -- 1. the next-token distribution with --lora / --lora-scaled ----------------------------------
@pytest.mark.parametrize("which", ["tiny", "gemma"])
def test_scaled_adapter_next_token_distribution_matches_llamacpp(which: str, request: pytest.FixtureRequest) -> None:
    if which == "tiny":
        model, adapter, _ = request.getfixturevalue("tiny")
        references = {"tiny F32": (model, "f32")}
    else:
        model, adapter = request.getfixturevalue("gemma_path"), request.getfixturevalue("gemma_adapter")
        # the F32 copy is llama.cpp's own dequantization of the Q4_K_M: the same weights in f32 math
        references = {"Gemma Q4_K_M": (model, "q4"), "Gemma, llama.cpp's F32 copy": (dequantized_f32(model), "f32")}
    ours = Ggtrain(model)
    n_last = 4
    ids = prompt_ids(ours.tok, 24)
    tried: list[Setting] = [((adapter, 1.0),), ((adapter, 0.6),), ((adapter, -0.7),)]  # --lora A is A:1
    ggtrain = {s: ours.logprobs(ids, s, n_last) for s in [(), *tried]}
    for what, (ref_model, kind) in references.items():
        for setting in tried:
            ref_ids, ref_lp = topk_of(log_softmax(llama_logits(ref_model, ids, n_last=n_last, loras=list(setting))))
            assert_matches(what, ref_ids, ref_lp, setting, ggtrain, TOL[kind], NOISE[kind])


# -- 2. llama-completion --lora / --lora-scaled: loaded, and its greedy continuation is ggtrain's ----
def llama_completion(model: Path, prompt: str, flags: list[str], session: Path) -> tuple[bytes, list[int], str]:
    """A greedy llama-completion run of N_PREDICT tokens: (the continuation it prints, the token ids of
    prompt + continuation, its log). The ids come from the session file --prompt-cache-all saves:
    magic "ggsn", version, token count, int32 tokens (llama_state_save_file), then the KV state."""
    session.unlink(missing_ok=True)
    cmd = [str(llamacpp.binary("llama-completion")), "-m", str(model), *flags, "-p", prompt,
           "-n", str(N_PREDICT), "--temp", "0", "-no-cnv", "--no-display-prompt", "-c", "256", "-t", "2",
           "--no-warmup", "--seed", "1", "-v", "--log-colors", "off",
           "--prompt-cache", str(session), "--prompt-cache-all"]
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=600, check=False)
    log = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{log[-3000:]}"
    text, sep, _ = proc.stdout.rpartition(b"\nllama_completion: saving final output to session file")
    assert sep, proc.stdout[-300:]
    head = np.fromfile(session, dtype="<u4", count=3)
    assert head[0] == 0x6767736E and head[1] == 10, f"{session}: not a version-10 llama.cpp session file"
    ids = np.fromfile(session, dtype="<i4", count=3 + int(head[2]))[3:]
    return text, ids.tolist(), log


@pytest.mark.parametrize("which", ["tiny", "gemma"])
def test_llama_completion_with_lora_continues_as_ggtrain(which: str, request: pytest.FixtureRequest,
                                                         tmp_path: Path) -> None:
    if which == "tiny":
        model, adapter, _ = request.getfixturevalue("tiny")
        kind, prompt = "f32", "This program is free software: you can redistribute"
    else:
        model, adapter = request.getfixturevalue("gemma_path"), request.getfixturevalue("gemma_adapter")
        kind, prompt = "q4", "The capital of France is"
    ours = Ggtrain(model)
    prompt_tokens = ours.tok.encode(prompt)
    n_tensors = 2 * len(read_gguf_adapter(adapter)[0])
    runs = {((adapter, 1.0),): ["--lora", str(adapter)],
            ((adapter, 0.6),): ["--lora-scaled", f"{adapter}:0.6"],
            ((adapter, -0.7),): ["--lora-scaled", f"{adapter}:-0.7"]}
    continuations = set()
    for setting, flags in runs.items():
        text, seq, log = llama_completion(model, prompt, flags, tmp_path / "session.bin")
        assert f"loading lora adapter from '{adapter}'" in log and f"loaded {n_tensors} tensors from lora file" in log
        assert seq[:len(prompt_tokens)] == prompt_tokens, "llama.cpp tokenized the prompt differently"
        gen = seq[len(prompt_tokens):]
        assert len(gen) == N_PREDICT or ours.tok.is_eog(gen[-1]), gen
        # what it printed is those tokens, piece by piece
        assert b"".join(ours.tok.piece_bytes(t, special=False) for t in gen) == text
        # each step: llama.cpp's token is the one ggtrain's greedy decoder takes, or a near-tie
        rows = ours.next_token_rows(np.asarray(seq), len(gen), setting)
        leads = rows.max(axis=1) - rows[np.arange(len(gen)), gen]
        same = int((rows.argmax(axis=1) == gen).sum())
        ties = f" (the others near-ties: ggtrain's best leads by {np.round(leads[leads > 0], 3).tolist()})"
        print(f"{which} {flags[0]} {label(setting)}: {text!r}; ggtrain's greedy pick at {same} of {len(gen)} "
              f"steps{ties if same < len(gen) else ''}")
        assert leads.max() < NOISE[kind], f"llama.cpp's tokens {gen}: ggtrain's best leads by {leads.round(3)}"
        assert same >= (len(gen) - 1 if kind == "f32" else len(gen) // 2)
        continuations.add(text)
    # the scale reaches the model: +1, +0.6 and -0.7 do not all continue alike (an ignored adapter or
    # scale would print one continuation three times)
    assert len(continuations) >= 2, continuations


# -- 3. llama-server: two adapters, hot-swapped and weighed over HTTP -----------------------------
def server_top(url: str, ids: np.ndarray, lora: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The server's top-k (ids, log-probs) of the next token after ids, from the model's distribution
    (post_sampling_probs false: a softmax of the logits, not the sampler's)."""
    body = {"prompt": ids.tolist(), "n_predict": 1, "n_probs": TOP_K, "temperature": 0,
            "cache_prompt": False, "post_sampling_probs": False, "return_tokens": True}
    if lora is not None:
        body["lora"] = lora
    res = llamacpp.http_json(url + "/completion", body)
    assert res["tokens_evaluated"] == len(ids), res
    probs = res["completion_probabilities"]
    assert len(probs) == 1 and "top_logprobs" in probs[0], f"unexpected probability fields: {probs}"
    top = probs[0]["top_logprobs"]
    assert len(top) == TOP_K and res["tokens"] == [top[0]["id"]]  # temperature 0 takes the most likely
    return np.array([[t["id"] for t in top]]), np.array([[t["logprob"] for t in top]])


def test_llama_server_hot_swaps_and_weighs_two_ggtrain_adapters(tiny: tuple[Path, Path, Path]) -> None:
    model, a0, a1 = tiny
    ours = Ggtrain(model)
    ids = prompt_ids(ours.tok, 24)

    def setting(s0: float, s1: float) -> Setting:
        return tuple((p, s) for p, s in ((a0, s0), (a1, s1)) if s != 0)

    # every setting the server is put in, and decoys a wrong scale, sign or ignored adapter would match
    scales = [(0, 0), (1, 1), (1, 0), (0.5, -0.8), (0, 1), (0.5, 0.8), (0.5, 0), (0, -0.8)]
    ggtrain = {setting(*s): ours.logprobs(ids, setting(*s)) for s in scales}

    def check(what: str, s0: float, s1: float, lora: list[dict] | None = None) -> None:
        ref_ids, ref_lp = server_top(url, ids, lora)
        claimed = setting(s0, s1)
        assert_matches(f"llama-server {what}", ref_ids, ref_lp, claimed, ggtrain, TOL["f32"], NOISE["f32"])
        p = {s: np.exp(np.take_along_axis(ggtrain[s], ref_ids, -1)) for s in (claimed, ())}
        p_diff, p_effect = np.abs(np.exp(ref_lp) - p[claimed]).max(), np.abs(p[claimed] - p[()]).max()
        print(f"  probabilities: max |diff| {p_diff:.2e}" + (f" (the adapters move them by {p_effect:.2e})"
                                                            if claimed else ""))
        assert p_diff < (p_effect / 5 if claimed else 1e-4)

    def scales_listed() -> list[float]:
        listed = llamacpp.http_json(url + "/lora-adapters")
        assert [a["id"] for a in listed] == [0, 1]
        assert [Path(a["path"]) for a in listed] == [a0, a1]
        return [a["scale"] for a in listed]

    def post(body: list[dict]) -> None:
        assert llamacpp.http_json(url + "/lora-adapters", body) == {"success": True}

    # the seed's command line: several --lora, loaded without applying them
    with llamacpp.server(model, "--lora", a0, "--lora", a1, "--lora-init-without-apply",
                         "-c", "256", "-t", "2", "-np", "1", "--no-warmup") as url:
        port = int(url.rsplit(":", 1)[1])
        listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert url == f"http://127.0.0.1:{port}" and listening == ["127.0.0.1"], listening  # loopback only
        start = scales_listed()
        # The server's README says scale 0; this llama.cpp reports (and applies) 1.0 for both
        # (ggml-org/llama.cpp issue 28674). Either way its numbers must be ggtrain's for the scales
        # it reports; POST /lora-adapters then sets them explicitly.
        assert start in ([0.0, 0.0], [1.0, 1.0]), start
        if start != [0.0, 0.0]:
            print("llama-server: --lora-init-without-apply left the adapters at scale 1 (llama.cpp issue 28674)")
        check("after start", *start)

        post([{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}])
        assert scales_listed() == [0.0, 0.0]
        check("both at 0", 0, 0)

        post([{"id": 0, "scale": 1.0}])  # an adapter left out of the list goes to 0
        assert scales_listed() == [1.0, 0.0]
        check("POST id 0 at 1", 1, 0)

        post([{"id": 0, "scale": 0.5}, {"id": 1, "scale": -0.8}])
        assert scales_listed() == pytest.approx([0.5, -0.8])
        check("POST 0.5 / -0.8", 0.5, -0.8)

        # the request's own lora list wins for that request only (unlisted adapters at 0) ...
        check("request lora id 1 at 1", 0, 1, lora=[{"id": 1, "scale": 1.0}])
        assert scales_listed() == pytest.approx([0.5, -0.8])
        # ... and the next request without one is back to the global scales
        check("next request", 0.5, -0.8)
    with pytest.raises(OSError):  # stopped: nothing listens on its port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with (pytest.raises(RuntimeError, match=r"llama-server exited with \d+: (?s:.*)failed to load model"),
          llamacpp.server(bad, "-c", "64", startup_timeout=120)):
        pass
    with pytest.raises(ValueError, match="--host"), llamacpp.server(bad, "--host", "0.0.0.0"):
        pass  # it binds 127.0.0.1 and nothing else
