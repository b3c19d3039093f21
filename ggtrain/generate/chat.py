"""A chat session: turns rendered through the model's chat template, the history kept in the KV cache.

Each turn renders the whole conversation (add_generation_prompt=True) and tokenizes it as llama.cpp
does a rendered chat; the tokens already in the Decoder that the new rendering starts with stay
there, and only the rest is evaluated. Normally that is the whole previous context (last prompt plus
the reply), so a turn costs its new text only; a template that rewrites earlier turns (or a reply
that re-tokenizes differently) makes the tokens diverge, and the Decoder is truncated to the first
differing token and evaluated from there. A reply stops at the model's end-of-generation tokens
and at the template's own end-of-turn token (the one it writes after an assistant message).

`run_chat` is the interactive loop (of `ggtrain chat`, through cli/chat.py's start_chat, which
`ggtrain generate -cnv` calls too): lines from stdin (a `> ` prompt only on a terminal), /exit and
/reset, end of input ends, the reply streamed to stdout, a timing line per turn on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import numpy as np

from ggtrain.errors import GGTrainError
from ggtrain.text.chat import ChatTemplate
from ggtrain.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from ggtrain.generate.decoder import Decoder
    from ggtrain.generate.sampling import Sampler
    from ggtrain.generate.stream import GenStats

EXIT, RESET = "/exit", "/reset"
_MARK = "ggtrain-reply-7c1e"  # assistant text no template rewrites, to find what it writes after a reply


class TurnRefused(GGTrainError):
    """The turn's prompt does not fit in the context that is left; the session is unchanged."""


def end_of_turn_ids(template: ChatTemplate, tok: Tokenizer) -> frozenset[int]:
    """The special token the template writes right after an assistant message (Gemma's <end_of_turn>,
    ChatML's <|im_end|>, Llama 3's <|eot_id|>), if it writes one."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = template.render(msgs, add_generation_prompt=False)
    except GGTrainError:
        return frozenset()
    at = text.rfind(_MARK)
    if at < 0:
        return frozenset()
    after = tok.encode(text[at + len(_MARK):], add_special=False, parse_special=True)
    return frozenset(after[:1]) if after and tok.is_control(after[0]) else frozenset()


@dataclass
class Turn:
    """What one turn did: the rendered prompt, tokens kept from the cache and evaluated, the reply."""

    prompt: str  # the whole conversation as rendered for this turn (add_generation_prompt=True)
    reused: int  # tokens of the prompt already in the Decoder
    fed: int  # prompt tokens evaluated this turn
    messages: list[dict[str, str]] = field(default_factory=list)  # the conversation up to this user message
    ids: list[int] = field(default_factory=list)  # the prompt's tokens
    reply_ids: list[int] = field(default_factory=list)
    reply: str = ""
    stats: GenStats | None = None


class ChatSession:
    """One conversation over a Decoder: `turn(text)` adds a user message and generates the reply."""

    def __init__(self, decoder: Decoder, tok: Tokenizer, template: ChatTemplate, sampler: Sampler,
                 system: str | None = None, n_predict: int = -1) -> None:
        self.decoder, self.tok, self.template, self.sampler = decoder, tok, template, sampler
        self.system, self.n_predict = system, n_predict
        self.stop = frozenset(tok.eog_ids) | end_of_turn_ids(template, tok)
        self.messages: list[dict[str, str]] = []
        self.context: list[int] = []  # the tokens the Decoder holds, in order
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and empty the KV cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.context = []
        self.decoder.truncate(0)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the template writes it before the model's reply."""
        return self.template.render(messages, add_generation_prompt=True)

    def tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation's tokens, as llama.cpp tokenizes a rendered chat (the BOS text left to the
        tokenizer when it adds BOS itself, special tokens parsed)."""
        text = self.template.render(messages, add_generation_prompt=True, for_tokenizer=True)
        return self.tok.encode(text, add_special=True, parse_special=True)

    def turn(self, text: str, on_text: Callable[[str], None] = lambda s: None) -> Turn:
        """Add the user's message, evaluate what the cache lacks, stream the reply (on_text gets its
        text as it is sampled). Raises TurnRefused when the prompt does not fit in the context."""
        return self.reply(self.prepare(text), on_text)

    def prepare(self, text: str) -> Turn:
        """The turn for the user's message `text`: rendered, tokenized, the cache truncated to what the
        new rendering keeps of it. Raises TurnRefused (nothing changed) when it does not fit."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.tokens(messages)
        n_ctx = self.decoder.n_ctx
        if len(ids) >= n_ctx:
            raise TurnRefused(f"this turn does not fit: the conversation would take {len(ids)} tokens and the "
                              f"context holds {n_ctx} (-c {n_ctx}); /reset to start over, or a larger -c")
        keep = min(common_prefix(self.context, ids), len(ids) - 1)  # evaluate one at least: its logits
        if keep < len(self.context):  # the template rewrote earlier text: re-evaluate from there
            self.decoder.truncate(keep)
            del self.context[keep:]
        return Turn(self.render(messages), keep, len(ids) - keep, messages, ids)

    def reply(self, t: Turn, on_text: Callable[[str], None] = lambda s: None) -> Turn:
        """Evaluate the prepared turn's new tokens and generate the reply; the conversation then holds it."""
        from ggtrain.generate.stream import Utf8Stream, generate_tokens

        text_out = Utf8Stream(lambda t: self.tok.piece_bytes(t, special=False), on_text)

        def on_token(tid: int) -> None:
            t.reply_ids.append(tid)
            text_out.push(tid)

        t.stats = generate_tokens(self.decoder, self.sampler, t.ids[t.reused:], self.n_predict, self.stop,
                                  on_token, history=self.context)
        text_out.flush()
        t.reply = text_out.text
        # what the Decoder holds: the stop token is not fed, nor the last token when -n or the context
        # ended the reply, nor anything after a Ctrl-C inside an evaluation
        self.context = (t.ids + t.reply_ids)[:self.decoder.n_past]
        self.messages = t.messages + [{"role": "assistant", "content": t.reply}]
        return t


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if differ.size else n


def pieces_text(tok: Tokenizer, ids: list[int]) -> str:
    """What a reply of these tokens shows: their pieces joined, control tokens as nothing (as llama.cpp
    prints a generation; unlike decode, no space prefix is taken off the first)."""
    return b"".join(tok.piece_bytes(i, special=False) for i in ids).decode("utf-8", errors="replace")


def timing_line(t: Turn) -> str:
    """One line per turn, llama-cli's figures: prompt and generation tokens per second."""
    s = t.stats
    assert s is not None

    def rate(n: int, secs: float) -> str:
        return f"{n / secs:.1f} t/s" if n and secs > 0 else "-"

    return (f"[ prompt: {s.prompt_tokens} tokens ({t.reused} cached), {rate(s.prompt_tokens, s.prompt_seconds)} | "
            f"generation: {s.gen_tokens} tokens, {rate(s.gen_tokens, s.gen_seconds)} ]")


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str:
    """The next line ('' at the end of input); on a terminal after a `> ` prompt."""
    if not interactive:
        return stdin.readline()
    if stdin is sys.stdin and stdout is sys.stdout:
        try:
            return input("\n> ") + "\n"  # with readline loaded: line editing and history
        except EOFError:
            return ""
    stdout.write("\n> ")
    stdout.flush()
    return stdin.readline()


def run_chat(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None, verbose_prompt: bool = False) -> int:
    """The conversation loop over stdin (see the module docstring); returns the number of turns."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    turns = 0
    if interactive:
        stderr.write(f"chat: {EXIT} or end of input (Ctrl-D) to quit, {RESET} to start over\n")
    if interactive and stdin is sys.stdin and stdout is sys.stdout:
        import readline  # noqa: F401  (input() then edits lines and keeps a history, as llama-cli does)
    while True:
        line = _read_line(stdin, stdout, interactive)
        if not line:  # end of input
            break
        text = line.rstrip("\r\n")
        if text.strip() == EXIT:
            break
        if text.strip() == RESET:
            session.reset()
            stderr.write("chat: conversation reset\n")
            continue
        if not text.strip():
            continue
        try:
            turn = session.prepare(text)
        except TurnRefused as e:
            stderr.write(f"chat: {e}\n")
            stderr.flush()
            continue
        turns += 1
        if verbose_prompt:
            stderr.write(f"chat: turn {turns} prompt ({turn.reused} tokens reused, {turn.fed} evaluated):\n"
                         f"{turn.prompt}\nchat: end of prompt\n")
            stderr.flush()
        session.reply(turn, lambda s: (stdout.write(s), stdout.flush()))
        stdout.write("\n")
        stdout.flush()
        stderr.write(timing_line(turn) + "\n")
        if turn.stats is not None and turn.stats.stopped_by == "interrupt":
            stderr.write("chat: reply interrupted (Ctrl-C); the conversation keeps what was written\n")
        if turn.stats is not None and turn.stats.stopped_by == "ctx":
            stderr.write(f"chat: the context is full (-c {session.decoder.n_ctx}); /reset to start over, "
                         "or a larger -c\n")
        stderr.flush()
    return turns
