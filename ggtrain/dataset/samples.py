"""Training examples as tokenized samples: each Example (ggtrain.dataset.formats) becomes token ids
with a loss mask, and a data file (or --train-data / --val-data / --val-split) becomes TokenData.

A sample of n tokens is `ids` (int32 (n,)) with per-token flags `train` (bool (n,), True = trained
when this token is the *target*): prompts, user turns and templates are context, responses and
assistant turns (with the end-of-turn marker) are trained. ggtrain.dataset.batches cuts samples
into --ctx windows and packs them into batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ggtrain.dataset.formats import DataDir, Example, ReadResult, data_dir, read_examples
from ggtrain.errors import GGTrainError

DEFAULT_CTX = 256
DEFAULT_SEED = 42

# Purposes mixed into the seed, so the shuffle, the offsets and the validation split draw
# independent streams from one --seed.
RNG_SHUFFLE, RNG_OFFSETS, RNG_VAL = 1, 2, 3


class BadSample(Exception):
    """A record that cannot become a sample (tokenize_file names its file and line)."""


class TokenizerLike(Protocol):
    """What tokenising samples uses of ggtrain.text.tokenizer.Tokenizer."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...


class TemplateLike(Protocol):
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str: ...


@dataclass(frozen=True)
class DataOptions:
    """Every data flag (cli/dataflags.py makes them click options; `ggtrain finetune` reuses them)."""

    train_data: Path | None = None
    val_data: Path | None = None
    format: str = "auto"
    text_column: str | None = None
    sample_start: str | None = None
    include_sample_start: bool = False
    escape: bool = False
    separate_with_eos: bool | None = None    # None: on for Alpaca/completion, off for text/chat
    separate_with_bos: bool | None = None    # None: the model's tokenizer.ggml.add_bos_token
    fill_with_next_samples: bool = True      # pack windows into rows (False: one window a row)
    sample_random_offsets: bool = False
    train_on_prompt: bool = False
    ctx: int = DEFAULT_CTX
    truncate: bool = False
    val_split: float = 0.0
    seed: int = DEFAULT_SEED
    skip_bad_lines: bool = False
    chat_template: Path | None = None


@dataclass
class Sample:
    ids: np.ndarray          # int32 (n,)
    train: np.ndarray        # bool (n,): token trained when it is the target
    where: str               # "line 12" in its file

    @property
    def n_targets(self) -> int:
        return max(len(self.ids) - 1, 0)

    @property
    def n_trained(self) -> int:
        return int(self.train[1:].sum())


@dataclass
class TokenData:
    """The tokenised samples of one file (or of the held-out part of it)."""

    path: Path
    container: str
    schema: str
    samples: list[Sample]
    bos_id: int | None
    bad: list[str] = field(default_factory=list)     # skipped records, "line 7: why"
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(s.ids) for s in self.samples)

    @property
    def n_trained(self) -> int:
        return sum(s.n_trained for s in self.samples)


def _chat_spans(tmpl: TemplateLike, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) parts.

    An assistant turn's span runs from the end of the prompt the template renders up to that turn
    (with the generation prompt, i.e. the assistant header) to the end of the conversation rendered
    through that turn: its content and the end-of-turn marker the model must learn to emit.
    Templates that re-render history (not prefix-stable) fall back to locating the content itself.
    """
    full = tmpl.render(messages, add_generation_prompt=False)
    parts: list[tuple[str, bool]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        span = None
        start = cursor  # where the turn's content can begin
        try:
            before = tmpl.render(messages[:i], add_generation_prompt=True) if i else None
            if before is not None and full.startswith(before) and len(before) >= cursor:
                start = len(before)
                after = tmpl.render(messages[:i + 1], add_generation_prompt=False)
                if full.startswith(after) and len(after) >= start:
                    span = (start, len(after))
        except Exception:  # noqa: BLE001 - a template may refuse a partial conversation; fall back below
            span = None
        if span is None:
            content = m["content"].strip()
            s = full.find(content, start) if content else -1
            if s < 0:
                raise ValueError(f"cannot find assistant turn {i} in the rendered chat template")
            span = (s, s + len(content))
        parts.append((full[cursor:span[0]], False))
        parts.append((full[span[0]:span[1]], True))
        cursor = span[1]
    parts.append((full[cursor:], False))
    return [p for p in parts if p[0]]


def _encode_parts(tok: TokenizerLike, parts: list[tuple[str, bool]], parse_special: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise the parts' concatenation once (what llama.cpp sees for the whole text) and flag each
    token with its part's train flag: ids int32 (n,), train bool (n,).

    A part boundary's token index is found by tokenising the text before it: when those tokens are
    a prefix of the whole (the usual case), the boundary falls between tokens and the prompt's
    tokens are exactly what inference feeds the model before it generates. Otherwise one token
    straddles the boundary; it is trained if either side is, so no trained text goes unlearned.
    """
    full = "".join(t for t, _ in parts)
    ids = np.asarray(tok.encode(full, add_special=False, parse_special=parse_special), dtype=np.int32)
    train = np.zeros(len(ids), dtype=np.bool_)
    pos = start = 0
    straddle: list[tuple[int, bool]] = []
    for k, (text, trained) in enumerate(parts):
        pos += len(text)
        end = len(ids)
        if k + 1 < len(parts):
            pre = np.asarray(tok.encode(full[:pos], add_special=False, parse_special=parse_special),
                             dtype=np.int32)
            m = min(len(pre), len(ids))
            diff = np.flatnonzero(ids[:m] != pre[:m])
            end = int(diff[0]) if len(diff) else m
            if len(diff) or len(pre) > len(ids):
                straddle.append((end, trained or parts[k + 1][1]))
        train[start:end] = trained
        start = max(start, end)
    for i, flag in straddle:
        if i < len(ids):
            train[i] = flag
    return ids, train


def tokenize_example(ex: Example, tok: TokenizerLike, opts: DataOptions, schema: str,
                     tmpl: TemplateLike | None = None) -> Sample:
    """One Example -> token ids and per-token train flags (before windowing)."""
    if ex.messages is not None:
        if tmpl is None:
            raise GGTrainError("chat data needs a chat template (--chat-template FILE)")
        try:
            parts = _chat_spans(tmpl, ex.messages)
        except Exception as e:  # noqa: BLE001 - the template refusing this conversation (roles, ...)
            raise BadSample(f"the chat template cannot render this conversation: {e}") from None
        # Rendered templates carry special tokens as text (<start_of_turn>, <|im_start|>): parse them.
        ids, train = _encode_parts(tok, parts, parse_special=True)
    elif ex.text is not None:
        # Plain text is text: a literal "<eos>" in a file is not a control token (llama.cpp's finetune).
        ids, train = _encode_parts(tok, [(ex.text, True)], parse_special=False)
    else:
        ids, train = _encode_parts(tok, [(ex.prompt or "", False), (ex.response or "", True)],
                                   parse_special=False)
    sep_bos = tok.add_bos if opts.separate_with_bos is None else opts.separate_with_bos
    sep_eos = schema in ("alpaca", "completion") if opts.separate_with_eos is None else opts.separate_with_eos
    if sep_bos and tok.bos_id is not None and (len(ids) == 0 or ids[0] != tok.bos_id):
        ids = np.concatenate([np.array([tok.bos_id], np.int32), ids])
        train = np.concatenate([[False], train])
    if sep_eos and tok.eos_id is not None and (len(ids) == 0 or ids[-1] != tok.eos_id):
        ids = np.concatenate([ids, np.array([tok.eos_id], np.int32)])
        train = np.concatenate([train, [True]])  # the end of a response: the model learns to stop
    if opts.train_on_prompt:
        train[:] = True
    return Sample(ids, train, ex.where)


def tokenize_file(rr: ReadResult, tok: TokenizerLike, opts: DataOptions,
                  tmpl: TemplateLike | None = None) -> TokenData:
    """All Examples of a read file -> TokenData; a sample with no trainable token is bad input."""
    samples: list[Sample] = []
    bad = list(rr.bad)

    def fail(where: str, msg: str) -> None:
        if not opts.skip_bad_lines:
            raise GGTrainError(f"{rr.path}: {where}: {msg} (--skip-bad-lines skips such records)")
        bad.append(f"{where}: {msg}")

    for ex in rr.examples:
        try:
            s = tokenize_example(ex, tok, opts, rr.schema, tmpl)
        except BadSample as e:
            fail(ex.where, str(e))
            continue
        if s.n_trained == 0:
            what = {"text": "the sample is empty", "chat": "no assistant turn with content",
                    "sharegpt": "no gpt turn with content"}.get(rr.schema, "the response is empty")
            fail(ex.where, f"no token to train on ({what})")
            continue
        samples.append(s)
    if not samples:
        raise GGTrainError(f"{rr.path}: no usable samples ({len(bad)} bad records skipped)")
    return TokenData(rr.path, rr.container, rr.schema, samples, tok.bos_id, bad, list(rr.notes))


def load_chat_template(opts: DataOptions, mf: Any, tok: TokenizerLike | None = None) -> TemplateLike:
    from ggtrain.text.chat import ChatTemplate

    try:
        return ChatTemplate.from_model_file(mf, override_path=opts.chat_template,
                                            tokenizer=tok if hasattr(tok, "piece") else None)
    except GGTrainError as e:
        if "--chat-template" in str(e):
            raise
        raise GGTrainError(f"{e} (chat data needs a chat template: pass --chat-template FILE)") from None


def load_file(path: Path, tok: TokenizerLike, opts: DataOptions, mf: Any = None,
              tmpl: TemplateLike | None = None) -> TokenData:
    """Read + tokenise one file with the data flags. The chat template is loaded only for chat data."""
    rr = read_examples(path, opts.format, opts.text_column, opts.sample_start, opts.include_sample_start,
                       opts.escape, opts.skip_bad_lines)
    if rr.schema in ("chat", "sharegpt") and tmpl is None:
        tmpl = load_chat_template(opts, mf, tok)
    data = tokenize_file(rr, tok, opts, tmpl)
    if rr.schema in ("chat", "sharegpt") and getattr(tmpl, "note", None):
        data.notes.append(tmpl.note)  # type: ignore[union-attr]
    return data


def split_validation(data: TokenData, frac: float, seed: int) -> tuple[TokenData, TokenData]:
    """Hold out a fraction of samples (seeded); a single text stream is split at a token instead."""
    if not 0.0 < frac < 1.0:
        raise GGTrainError(f"--val-split {frac}: expected a fraction between 0 and 1")
    n = len(data.samples)
    if n >= 2:
        k = min(max(1, round(frac * n)), n - 1)
        rng = np.random.default_rng([seed & 0xFFFFFFFF, RNG_VAL])
        val_idx = set(rng.permutation(n)[:k].tolist())
        train = [s for i, s in enumerate(data.samples) if i not in val_idx]
        val = [s for i, s in enumerate(data.samples) if i in val_idx]
    else:
        s = data.samples[0]
        cut = len(s.ids) - max(2, round(frac * len(s.ids)))
        if cut < 2:
            raise GGTrainError(f"{data.path}: too little text to hold out {frac:g} of it for validation")
        head = 1 if (data.bos_id is not None and s.ids[0] == data.bos_id) else 0
        train = [Sample(s.ids[:cut], s.train[:cut], s.where)]
        val_ids = np.concatenate([s.ids[:head], s.ids[cut:]])
        val_tr = np.concatenate([s.train[:head], s.train[cut:]])
        val = [Sample(val_ids, val_tr, f"{s.where} (last {frac:g})")]
    return replace(data, samples=train), replace(data, samples=val, bad=[], notes=[])


@dataclass
class Prepared:
    train: TokenData
    val: TokenData | None
    val_source: str | None = None   # where the validation set came from, for the summary


def _mlx_dir(path: Path | None, opts: DataOptions) -> DataDir | None:
    if path is None or opts.format == "hf" or not Path(path).is_dir():
        return None
    return data_dir(Path(path))


def prepare_data(opts: DataOptions, tok: TokenizerLike, mf: Any = None,
                 tmpl: TemplateLike | None = None) -> Prepared:
    """The training set and the held-out set: --val-data FILE, --val-split of the training file, or
    the valid.jsonl of a --train-data directory in MLX-LM's layout (train.jsonl, valid.jsonl)."""
    if opts.train_data is None:
        raise GGTrainError("no training data: pass --train-data FILE")
    if opts.ctx < 2:
        raise GGTrainError(f"--ctx {opts.ctx}: expected at least 2")
    if opts.val_data is not None and opts.val_split:
        raise GGTrainError("pass either --val-data FILE or --val-split F, not both")
    layout = _mlx_dir(opts.train_data, opts)
    train = load_file(Path(opts.train_data), tok, opts, mf, tmpl)
    val, src = None, None
    if opts.val_data is not None:
        vdir = _mlx_dir(opts.val_data, opts)
        if vdir is not None and vdir.valid is None:
            raise GGTrainError(f"{opts.val_data}: a --val-data directory needs a valid.jsonl")
        vpath = vdir.valid if vdir is not None else Path(opts.val_data)
        val, src = load_file(vpath, tok, opts, mf, tmpl), f"--val-data {vpath}"
    elif opts.val_split:
        train, val = split_validation(train, opts.val_split, opts.seed)
        src = f"--val-split {opts.val_split:g} of the training file"
    elif layout is not None and layout.valid is not None:
        val, src = load_file(layout.valid, tok, opts, mf, tmpl), str(layout.valid)
    if layout is not None:
        if layout.valid is None:
            use = "it has no valid.jsonl"
        elif opts.val_data is None and not opts.val_split:
            use = "valid.jsonl for validation"
        else:
            use = f"valid.jsonl is not used ({'--val-data' if opts.val_data else '--val-split'} given)"
        train.notes.append(f"{layout.path} is an MLX-LM data directory: train.jsonl for training, {use}"
                           + ("; test.jsonl is not read (MLX-LM keeps it for testing)" if layout.test else ""))
    return Prepared(train, val, src)
