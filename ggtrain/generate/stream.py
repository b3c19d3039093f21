"""The generation loop: prefill the prompt, then sample a token, hand it on, feed it back, until an
end-of-generation token, n_predict tokens or a full context; timed as llama.cpp times it.

    stats = generate_tokens(decoder, sampler, prompt_ids, n_predict, stop=tok.eog_ids, on_token=print_it)

llama.cpp's accounting (common_perf_print): "prompt eval" is the prefill, "eval" the decode runs of
the generated tokens fed back (one fewer than sampled when n_predict ends the run: the last one is
never evaluated), sampling is timed apart. Ctrl-C ends the loop between tokens with stopped_by
"interrupt" and the figures so far.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from ggtrain.errors import GGTrainError
from ggtrain.generate.decoder import Decoder
from ggtrain.generate.sampling import Sampler

STOP_REASONS = ("eog", "n_predict", "ctx", "interrupt")


@dataclass
class GenStats:
    """What a generation did and how long it took."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    gen_tokens: int = 0  # tokens sampled and handed to on_token (the stop token is not counted)
    gen_seconds: float = 0.0  # wall time after the prefill: decode runs + sampling + on_token
    stopped_by: str = ""  # one of STOP_REASONS
    eval_runs: int = 0  # decode runs of generated tokens (llama.cpp's "eval ... runs")
    eval_seconds: float = 0.0
    sample_seconds: float = 0.0


def generate_tokens(decoder: Decoder, sampler: Sampler, prompt: Sequence[int], n_predict: int,
                    stop: Collection[int], on_token: Callable[[int], None],
                    history: Sequence[int] = ()) -> GenStats:
    """Evaluate `prompt` after what the decoder holds, then sample up to n_predict tokens (-1: until a
    stop token or the context is full), each passed to on_token and fed back; a stop token ends the
    run without being fed or passed on. history: tokens already in the context before `prompt` (the
    repeat penalty's window reaches back into them)."""
    if n_predict < -1:
        raise GGTrainError(f"-n/--n-predict {n_predict}: must be -1 (until the end) or 0 and more")
    prompt = list(prompt)
    if not prompt:
        raise GGTrainError("the prompt is empty: there is nothing to continue")
    if decoder.n_past + len(prompt) > decoder.n_ctx:
        raise GGTrainError(f"the prompt is {len(prompt)} tokens, the context holds {decoder.n_ctx}"
                           + (f" ({decoder.n_past} in use)" if decoder.n_past else "") + ": raise -c/--ctx-size")
    stop = frozenset(stop)
    stats = GenStats(prompt_tokens=len(prompt))
    seen = list(history) + prompt
    t0 = time.perf_counter()
    t1 = None
    try:
        logits = decoder.eval(prompt)
        t1 = time.perf_counter()
        stats.stopped_by = "n_predict" if n_predict == 0 else ""
        while not stats.stopped_by:
            ts = time.perf_counter()
            tok = sampler.sample(logits, seen)
            stats.sample_seconds += time.perf_counter() - ts
            if tok in stop:
                stats.stopped_by = "eog"
                break
            on_token(tok)
            seen.append(tok)
            stats.gen_tokens += 1
            if 0 <= n_predict <= stats.gen_tokens:
                stats.stopped_by = "n_predict"
            elif decoder.n_past >= decoder.n_ctx:
                stats.stopped_by = "ctx"
            else:
                te = time.perf_counter()
                logits = decoder.eval([tok])
                stats.eval_seconds += time.perf_counter() - te
                stats.eval_runs += 1
    except KeyboardInterrupt:
        stats.stopped_by = "interrupt"
    end = time.perf_counter()
    t1 = end if t1 is None else t1
    stats.prompt_seconds = t1 - t0
    stats.gen_seconds = end - t1
    return stats


class Utf8Stream:
    """Token pieces -> text, a character only once its last byte has come (no broken UTF-8 shown);
    piece(token) gives a token's bytes (control tokens: none, as llama.cpp shows them). What
    generate prints and chat replies with; `text` is everything emitted so far."""

    def __init__(self, piece: Callable[[int], bytes], emit: Callable[[str], None]) -> None:
        self.piece, self.emit = piece, emit
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: list[str] = []

    def push(self, tid: int) -> None:
        s = self.decoder.decode(self.piece(tid))
        if s:
            self.parts.append(s)
            self.emit(s)

    def flush(self) -> None:
        s = self.decoder.decode(b"", final=True)
        if s:
            self.parts.append(s)
            self.emit(s)

    @property
    def text(self) -> str:
        return "".join(self.parts)
