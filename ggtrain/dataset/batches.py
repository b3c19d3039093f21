"""Training data as token batches: tokenise Examples with loss masks, cut them into --ctx windows,
pack windows into rows (each with its own segment id and positions from 0), and serve batches in a
seeded order with a resumable (epoch, index) position.

The pieces, for a sample of n tokens `ids` (int32 (n,)) with per-token flags `train` (bool (n,),
True = trained when this token is the *target*):
    pairs       j = 0 .. n-2: input ids[j] -> target ids[j+1], loss weight train[j+1]
    window      a contiguous range of pairs [a, b), b - a <= ctx; a sample with more than ctx pairs
                is split on a grid of ctx (or cut to its first window with --truncate)
    row         ctx positions holding one window (padded) or several packed ones
                (--fill-with-next-samples, the default): positions restart at 0 and the segment id
                changes at every window, so attention never crosses a sample boundary
    batch       `Batch` of B rows: tokens, targets, mask, positions, segments, all (B, ctx)

A window that starts inside a sample (a > 0) gets BOS as its first input in place of ids[a] when the
sample itself starts with BOS, so every row starts the way the model saw text in pretraining.
Windows without a single trained target are dropped: with no context across rows they add nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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
_RNG_SHUFFLE, _RNG_OFFSETS, _RNG_VAL = 1, 2, 3


class BadSample(Exception):
    """A record that cannot become a sample (tokenize_file names its file and line)."""


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    n_vocab: int

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...
    def decode(self, ids: Any) -> str: ...


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


@dataclass
class Batch:
    """What one trainer step consumes. Row r, position i: input tokens[r, i] predicts targets[r, i]."""

    tokens: np.ndarray       # int32 (B, ctx) input ids
    targets: np.ndarray      # int32 (B, ctx) next-token ids
    mask: np.ndarray         # float32 (B, ctx) 1 where the target is trained, else 0
    positions: np.ndarray    # int32 (B, ctx) position within the sample window, from 0
    segments: np.ndarray     # int32 (B, ctx) 1, 2, ... per window in the row; 0 = padding
    epoch: int = 0           # data position of the first row (for logs)
    index: int = 0

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_trained(self) -> int:
        return int(self.mask.sum())

    def split(self, rows: int) -> list[Batch]:
        """Micro-batches of at most `rows` rows (the memory monitor's unit), in order."""
        return [Batch(self.tokens[i:i + rows], self.targets[i:i + rows], self.mask[i:i + rows],
                      self.positions[i:i + rows], self.segments[i:i + rows], self.epoch, self.index + i)
                for i in range(0, self.n_rows, rows)]


# --- tokenising Examples -----------------------------------------------------------------------------

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
        rng = np.random.default_rng([seed & 0xFFFFFFFF, _RNG_VAL])
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


# --- windows, rows, batches --------------------------------------------------------------------------

@dataclass
class EpochPlan:
    """The rows of one epoch: row k holds windows win_*[row_ptr[k]:row_ptr[k+1]] in order."""

    win_sample: np.ndarray   # int64 (W,) sample index of each window
    win_start: np.ndarray    # int64 (W,) first pair a
    win_stop: np.ndarray     # int64 (W,) end pair b (exclusive)
    row_ptr: np.ndarray      # int64 (R+1,)
    n_split: int             # samples longer than ctx (split or truncated)
    n_dropped: int           # windows dropped for having no trained target
    n_cut_tokens: int        # targets lost to --truncate

    @property
    def n_rows(self) -> int:
        return len(self.row_ptr) - 1


def plan_windows(samples: list[Sample], ctx: int, truncate: bool, rng: np.random.Generator | None
                 ) -> tuple[list[tuple[int, int, int]], int, int, int]:
    """Windows (sample, a, b) of every sample in order; rng given = --sample-random-offsets."""
    windows: list[tuple[int, int, int]] = []
    n_split = n_dropped = n_cut = 0
    for si, s in enumerate(samples):
        p = s.n_targets
        if p <= ctx:
            windows.append((si, 0, p))
            continue
        n_split += 1
        tcum = np.concatenate([[0], np.cumsum(s.train[1:], dtype=np.int64)])  # trained targets in [0, j)
        if truncate:
            a = int(rng.integers(0, p - ctx + 1)) if rng is not None else 0
            cand = [(a, a + ctx)]
            n_cut += p - ctx
        else:
            # llama.cpp starts a sample at a random offset; here the split grid moves instead, so no
            # token is lost and the window boundaries differ from epoch to epoch.
            r = int(rng.integers(0, ctx)) if rng is not None else 0
            cuts = [0] + list(range(r if r else ctx, p, ctx)) + [p]
            cand = [(cuts[k], cuts[k + 1]) for k in range(len(cuts) - 1) if cuts[k + 1] > cuts[k]]
        for a, b in cand:
            if tcum[b] - tcum[a] > 0:
                windows.append((si, a, b))
            else:
                n_dropped += 1
    return windows, n_split, n_dropped, n_cut


def pack_rows(lengths: np.ndarray, ctx: int, fill: bool) -> np.ndarray:
    """row_ptr (R+1,) for windows of these lengths, in order: next-fit packing, or one a row.

    Next-fit (close the row when the next window does not fit) keeps the shuffled order and never
    cuts a window, so a response is never separated from its prompt; the padding it leaves is
    reported by `ggtrain data`.
    """
    if not fill:
        return np.arange(len(lengths) + 1, dtype=np.int64)
    ptr = [0]
    used = 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > ctx:
            ptr.append(i)
            used = 0
        used += n
    ptr.append(len(lengths))
    return np.asarray(ptr if len(lengths) else [0], dtype=np.int64)


class Batches:
    """Seeded, resumable batches over TokenData.

    Epoch e: the windows (with --sample-random-offsets, drawn anew from (seed, e)) are shuffled with
    (seed, e) and packed into rows; batch k is rows [k*B, (k+1)*B) (the last batch of an epoch may
    be shorter). `state()` / `load_state()` carry the position (epoch, index of the next row): the
    same seed and state give the same batches, so a resumed run sees exactly the data it would have.
    """

    def __init__(self, data: TokenData, batch_size: int, opts: DataOptions, shuffle: bool = True):
        if batch_size < 1:
            raise GGTrainError(f"batch size {batch_size}: expected at least 1")
        self.data = data
        self.batch_size = batch_size
        self.ctx = opts.ctx
        self.seed = opts.seed & 0xFFFFFFFF
        self.fill = opts.fill_with_next_samples
        self.random_offsets = opts.sample_random_offsets and shuffle
        self.truncate = opts.truncate
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._plans: dict[int, EpochPlan] = {}
        # All samples end to end: a batch is one gather from these.
        lens = np.array([len(x.ids) for x in data.samples], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)   # (S,)
        self._ids = np.concatenate([x.ids for x in data.samples]).astype(np.int32)      # (N,)
        self._train = np.concatenate([x.train for x in data.samples])                   # bool (N,)

    # -- plans
    def plan(self, epoch: int) -> EpochPlan:
        """The rows of an epoch (cached: the current and the next one)."""
        p = self._plans.get(epoch)
        if p is not None:
            return p
        off_rng = np.random.default_rng([self.seed, _RNG_OFFSETS, epoch]) if self.random_offsets else None
        wins, n_split, n_dropped, n_cut = plan_windows(self.data.samples, self.ctx, self.truncate, off_rng)
        w = np.asarray(wins, dtype=np.int64).reshape(-1, 3)
        if self.shuffle:
            w = w[np.random.default_rng([self.seed, _RNG_SHUFFLE, epoch]).permutation(len(w))]
        row_ptr = pack_rows(w[:, 2] - w[:, 1], self.ctx, self.fill)
        p = EpochPlan(w[:, 0].copy(), w[:, 1].copy(), w[:, 2].copy(), row_ptr, n_split, n_dropped, n_cut)
        self._plans = {k: v for k, v in self._plans.items() if k in (epoch - 1, epoch)}
        self._plans[epoch] = p
        return p

    def rows_in_epoch(self, epoch: int = 0) -> int:
        return self.plan(epoch).n_rows

    def steps_in_epoch(self, epoch: int = 0) -> int:
        return math.ceil(self.rows_in_epoch(epoch) / self.batch_size)

    def total_steps(self, epochs: int) -> int:
        """Steps in epochs 0 .. epochs-1 (for a schedule planned over the whole run)."""
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    # -- position
    def state(self) -> dict[str, int]:
        """The position to checkpoint: the next batch starts at row `index` of epoch `epoch`."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise GGTrainError(f"the checkpoint's data seed {state['seed']} differs from --seed {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def next(self) -> Batch:
        """The next batch; after an epoch's last batch the position moves to the next epoch."""
        n = self.rows_in_epoch(self.epoch)
        if self.index >= n:
            self.epoch, self.index = self.epoch + 1, 0
            n = self.rows_in_epoch(self.epoch)
        b = self.get(self.epoch, self.index, self.batch_size)
        self.index += b.n_rows
        if self.index >= n:
            self.epoch, self.index = self.epoch + 1, 0
        return b

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """Every batch of one epoch in order (validation: one pass, no shuffle with shuffle=False)."""
        n = self.rows_in_epoch(epoch)
        for i in range(0, n, self.batch_size):
            yield self.get(epoch, i, self.batch_size)

    # -- assembly
    def get(self, epoch: int, index: int, n_rows: int) -> Batch:
        """Rows [index, index + n_rows) of an epoch as a Batch (fewer at the epoch's end).

        One gather from the flat token array: every (row, column) of every window is computed
        with numpy index arithmetic, no loop over rows, windows or tokens.
        """
        p = self.plan(epoch)
        r0, r1 = index, min(index + n_rows, p.n_rows)
        if r0 >= r1:
            raise IndexError(f"row {index} is past the end of epoch {epoch} ({p.n_rows} rows)")
        B, C = r1 - r0, self.ctx
        w0, w1 = int(p.row_ptr[r0]), int(p.row_ptr[r1])
        start, stop = p.win_start[w0:w1], p.win_stop[w0:w1]            # int64 (W,)
        lens = stop - start
        W = w1 - w0
        row_of_win = np.repeat(np.arange(B), np.diff(p.row_ptr[r0:r1 + 1]))     # (W,)
        excl = np.cumsum(lens) - lens                                  # first column if rows were one
        first_win = p.row_ptr[r0:r1] - w0                              # (B,) first window of each row
        col0 = excl - excl[first_win][row_of_win]                      # (W,) first column in its row
        seg = np.arange(W) - first_win[row_of_win] + 1                 # (W,) 1, 2, ... within the row
        win_of_tok = np.repeat(np.arange(W), lens)                     # (T,)
        pos = np.arange(len(win_of_tok)) - np.repeat(excl, lens)       # (T,) position in its window
        src = self._offsets[p.win_sample[w0:w1]][win_of_tok] + start[win_of_tok] + pos   # input index
        row = row_of_win[win_of_tok]
        col = col0[win_of_tok] + pos

        tokens = np.zeros((B, C), np.int32)
        targets = np.zeros((B, C), np.int32)
        mask = np.zeros((B, C), np.float32)
        segments = np.zeros((B, C), np.int32)
        # Padding (segment 0, masked) counts its own positions from 0 after the row's last window.
        used = np.bincount(row_of_win, weights=lens, minlength=B).astype(np.int64)
        positions = (np.arange(C)[None, :] - used[:, None]).astype(np.int32)
        flat = row * C + col                                           # (T,) index into a (B, C) array
        tokens.ravel()[flat] = self._ids[src]
        targets.ravel()[flat] = self._ids[src + 1]
        mask.ravel()[flat] = self._train[src + 1]
        positions.ravel()[flat] = pos
        segments.ravel()[flat] = seg[win_of_tok]
        bos = self.data.bos_id
        if bos is not None:
            # A window starting inside a sample that begins with BOS gets BOS as its first input.
            cont = (start > 0) & (self._ids[self._offsets[p.win_sample[w0:w1]]] == bos)
            tokens[row_of_win[cont], col0[cont]] = bos
        return Batch(tokens, targets, mask, positions, segments, epoch, index)


def load_batches(opts: DataOptions, tok: TokenizerLike, batch_size: int, mf: Any = None,
                 tmpl: TemplateLike | None = None) -> tuple[Batches, Batches | None, Prepared]:
    """What the trainer calls: training batches (shuffled per epoch from --seed) and, with
    --val-data / --val-split, validation batches (fixed order: iterate `val.epoch_batches(0)`)."""
    prep = prepare_data(opts, tok, mf, tmpl)
    train = Batches(prep.train, batch_size, opts)
    val = Batches(prep.val, batch_size, opts, shuffle=False) if prep.val is not None else None
    return train, val, prep


# --- what `ggtrain data` reports -----------------------------------------------------------------------

@dataclass
class DataStats:
    n_samples: int
    n_tokens: int
    n_trained: int
    max_len: int
    n_split: int
    n_dropped: int
    n_cut_tokens: int
    n_rows: int
    n_windows: int
    n_positions_used: int
    n_trained_in_rows: int


def data_stats(data: TokenData, opts: DataOptions) -> DataStats:
    """Counts for the first epoch's layout (no shuffle: the layout's totals do not depend on it)."""
    b = Batches(data, 1, replace(opts, sample_random_offsets=False), shuffle=False)
    p = b.plan(0)
    lens = p.win_stop - p.win_start
    tcum = np.concatenate([[0], np.cumsum(b._train, dtype=np.int64)])  # trained tokens before index i
    first = b._offsets[p.win_sample] + p.win_start + 1                  # first target of each window
    trained_in_rows = int((tcum[first + lens] - tcum[first]).sum())
    return DataStats(
        n_samples=len(data.samples), n_tokens=data.n_tokens, n_trained=data.n_trained,
        max_len=max(len(s.ids) for s in data.samples), n_split=p.n_split, n_dropped=p.n_dropped,
        n_cut_tokens=p.n_cut_tokens, n_rows=p.n_rows, n_windows=len(lens),
        n_positions_used=int(lens.sum()), n_trained_in_rows=trained_in_rows)
