"""The vocabulary of a GGUF, read from its tokenizer.ggml.* metadata as llama.cpp reads it
(llama_vocab::impl::load): token texts, scores and attributes, the special tokens (BOS, EOS, EOT,
the end-of-generation set, the tokens cut out of text before tokenizing) and the settings
(add_bos / add_eos, space prefix, pre-tokenizer, merges). ggtrain.text.tokenizer encodes with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile

# GGUF tokenizer.ggml.token_type values
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL = 0, 1, 2, 3
TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 4, 5, 6

# token attributes (bit flags, llama.h's llama_token_attr)
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL = 1 << 0, 1 << 1, 1 << 2, 1 << 3
ATTR_USER_DEFINED, ATTR_BYTE, ATTR_NORMALIZED = 1 << 4, 1 << 5, 1 << 6
ATTR_LSTRIP, ATTR_RSTRIP, ATTR_SINGLE_WORD = 1 << 7, 1 << 8, 1 << 9
_TYPE_TO_ATTR = {TYPE_UNKNOWN: ATTR_UNKNOWN, TYPE_UNUSED: ATTR_UNUSED, TYPE_NORMAL: ATTR_NORMAL,
                 TYPE_CONTROL: ATTR_CONTROL, TYPE_USER_DEFINED: ATTR_USER_DEFINED, TYPE_BYTE: ATTR_BYTE}

SPM, BPE = "spm", "bpe"   # tokenizer.ggml.model "llama" (SentencePiece-style), "gpt2" (byte-level BPE)

# texts llama.cpp recognises as special even when the converter did not mark them control
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = (
    ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
     "<|code_prefix|>", "<|prefix|>"),
    ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
     "<|code_suffix|>", "<|suffix|>"),
    ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
     "<|code_middle|>", "<|middle|>"),
    ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ("<|file_sep|>",),
)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")


@dataclass(frozen=True, eq=False)
class Vocab:
    """What a GGUF says about its tokens; `Vocab.from_model_file(mf)` reads it.

    kind ("spm" / "bpe"); tokens (texts), token_to_id, scores, attr (llama.cpp ATTR_* bits);
    bos_id, eos_id, eot_id (None when absent); eog_ids (end-of-generation set); special_ids (tokens
    cut out of text, in llama.cpp's order); add_bos, add_eos, add_space_prefix; pre
    (tokenizer.ggml.pre) and what it selects (pre_regexes, ignore_merges, clean_spaces); merges (BPE).
    """

    kind: str
    tokens: list[str]
    token_to_id: dict[str, int]
    scores: np.ndarray           # float32 (n,)
    attr: np.ndarray             # int32 (n,)
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eog_ids: frozenset[int]
    special_ids: list[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    pre: str | None
    pre_regexes: list[str]       # BPE: the pre-tokenizer's regex chain; SPM: empty
    ignore_merges: bool
    clean_spaces: bool           # decode cleans spaces before punctuation (llama.cpp's clean_spaces)
    merges: list[str]            # BPE: tokenizer.ggml.merges by rank; SPM: empty

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def is_control(self, i: int) -> bool:
        return bool(self.attr[i] & ATTR_CONTROL)

    def is_user_defined(self, i: int) -> bool:
        return bool(self.attr[i] & ATTR_USER_DEFINED)

    def is_byte(self, i: int) -> bool:
        return bool(self.attr[i] & ATTR_BYTE)

    def is_eog(self, i: int) -> bool:
        return i in self.eog_ids

    @classmethod
    def from_model_file(cls, mf: ModelFile) -> Vocab:
        return cls.from_metadata(mf.metadata, mf.path)

    @classmethod
    def from_metadata(cls, meta: dict, path: object = "<metadata>") -> Vocab:
        """Read the vocabulary; bad or missing tokenizer metadata is a GGTrainError naming `path`."""
        kind, tokens, scores, attr = _read_tokens(meta, path)
        token_to_id = dict(zip(tokens, range(len(tokens))))  # later duplicates win
        s = _Settings.read(meta, kind, len(tokens), path)
        eot_id, eog_ids = _mark_special(attr, tokens, token_to_id, s)
        # special tokens cut out of the text before tokenizing, longest first
        sp = np.flatnonzero(attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
        sp_len = np.array([len(tokens[i].encode()) for i in sp], dtype=np.int64)
        special_ids: list[int] = sp[np.argsort(-sp_len, kind="stable")].tolist()
        _model_attributes(meta, s.pre, attr, special_ids, token_to_id)
        return cls(kind, tokens, token_to_id, scores, attr, s.bos_id, s.eos_id, eot_id, eog_ids, special_ids,
                   s.add_bos, s.add_eos, s.add_space_prefix, s.pre, s.pre_regexes, s.ignore_merges,
                   s.clean_spaces, s.merges)


def _read_tokens(meta: dict, path: object) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """Kind, tokens, scores float32 (n,) and attributes int32 (n,) from the token types."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise GGTrainError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.model / "
                           f"tokenizer.ggml.tokens missing)")
    if model == "llama":
        kind = SPM
    elif model == "gpt2":
        kind = BPE
    else:
        raise GGTrainError(f"{path}: unsupported tokenizer.ggml.model '{model}' (supported: "
                           f"'llama' SentencePiece-style, 'gpt2' byte-level BPE)")
    n = len(tokens)
    # llama.cpp renames empty tokens so every text is unique-ish and non-empty
    texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    raw_scores = meta.get("tokenizer.ggml.scores")
    scores = (np.zeros(n, dtype=np.float32) if raw_scores is None
              else np.asarray(raw_scores, dtype=np.float32)[:n].copy())
    if len(scores) < n:
        raise GGTrainError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        token_type = np.full(n, TYPE_NORMAL, dtype=np.int32)
    else:
        token_type = np.asarray(types, dtype=np.int32)[:n].copy()
        if len(token_type) < n:
            raise GGTrainError(f"{path}: tokenizer.ggml.token_type has {len(token_type)} entries "
                               f"for {n} tokens")
    attr = np.zeros(n, dtype=np.int32)
    for t, a in _TYPE_TO_ATTR.items():
        attr[token_type == t] = a
    attr[(token_type < 0) | (token_type > TYPE_BYTE)] = 0
    return kind, texts, scores, attr


def _meta_id(meta: dict, key: str) -> int | None:
    v = meta.get(key)
    return int(v) if isinstance(v, (int, np.integer)) else None


@dataclass
class _Settings:
    """The settings and special ids the metadata gives (or the tokenizer family's defaults)."""

    pre: str | None
    pre_regexes: list[str]
    ignore_merges: bool
    clean_spaces: bool
    merges: list[str]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    fim_ids: list[int | None]    # prefix, suffix, middle, pad, repo, file separator

    @classmethod
    def read(cls, meta: dict, kind: str, n: int, path: object) -> _Settings:
        pre = meta.get("tokenizer.ggml.pre")
        regexes: list[str] = []
        merges: list[str] = []
        ignore_merges = clean_spaces = False
        if kind == SPM:
            bos, eos = 1, 2
            add_space_prefix, add_bos, add_eos = True, True, False
        else:
            from ggtrain.text.pretokenize import pre_tokenizer

            bos, eos = 11, 11
            regexes, ignore_merges, clean_spaces, add_bos = pre_tokenizer(pre, path)
            add_space_prefix, add_eos = False, False
            raw_merges = meta.get("tokenizer.ggml.merges")
            if raw_merges is None:
                raise GGTrainError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
            merges = list(raw_merges)
        if "tokenizer.ggml.add_space_prefix" in meta:
            add_space_prefix = bool(meta["tokenizer.ggml.add_space_prefix"])

        def special(key: str, default: int | None) -> int | None:
            if default is not None and default >= n:
                default = None
            v = _meta_id(meta, f"tokenizer.ggml.{key}")
            return v if v is not None and 0 <= v < n else default

        bos_id, eos_id = special("bos_token_id", bos), special("eos_token_id", eos)
        fim_keys = ("fim_pre_token_id", "fim_suf_token_id", "fim_mid_token_id", "fim_pad_token_id",
                    "fim_rep_token_id", "fim_sep_token_id")
        fim: list[int | None] = [special(k, None) for k in fim_keys]
        for i, old in enumerate(("prefix_token_id", "suffix_token_id", "middle_token_id")):
            fim[i] = special(old, fim[i])
        if "tokenizer.ggml.add_bos_token" in meta:
            add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_eos_token" in meta:
            add_eos = bool(meta["tokenizer.ggml.add_eos_token"])
        if add_bos and bos_id is None:
            raise GGTrainError(f"{path}: tokenizer adds a BOS token but has no BOS id")
        if add_eos and eos_id is None:
            raise GGTrainError(f"{path}: tokenizer adds an EOS token but has no EOS id")
        return cls(pre, regexes, ignore_merges, clean_spaces, merges, add_bos, add_eos, add_space_prefix,
                   bos_id, eos_id, special("eot_token_id", None), special("eom_token_id", None), fim)


def _mark_special(attr: np.ndarray, tokens: list[str], token_to_id: dict[str, int], s: _Settings
                  ) -> tuple[int | None, frozenset[int]]:
    """Special tokens llama.cpp finds by their text: forced to control (in attr), the EOT id and the
    end-of-generation set."""
    def mark(texts: Iterable[str]) -> int | None:
        for t in texts:
            i = token_to_id.get(t)
            if i is not None:
                attr[i] |= ATTR_CONTROL
                return i
        return None

    eot_id = s.eot_id if s.eot_id is not None else mark(_EOT_TEXTS)
    eom_id = s.eom_id if s.eom_id is not None else mark(_EOM_TEXTS)
    fim = [f if f is not None else mark(texts) for f, texts in zip(s.fim_ids, _FIM_TEXTS)]
    control = (attr & ATTR_CONTROL) != 0
    unused = np.array(["unused" in t for t in np.asarray(tokens, dtype=object)[control]], dtype=bool)
    attr[np.flatnonzero(control)[unused]] |= ATTR_UNUSED
    eog = {i for i in (fim[3], fim[4], fim[5]) if i is not None}
    for t in _EOG_TEXTS:
        i = token_to_id.get(t)
        if i is not None:
            eog.add(i)
            attr[i] |= ATTR_CONTROL
    for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
        if t in token_to_id:
            attr[token_to_id[t]] = ATTR_USER_DEFINED
    eog |= {i for i in (s.eos_id, eot_id, eom_id) if i is not None}
    texts = {tokens[i]: i for i in eog}
    if ("<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                                or ("<|calls|>" in texts and "<|flush|>" in texts))):
        eog.discard(texts["<|end|>"])
        attr[texts["<|end|>"]] = ATTR_USER_DEFINED
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])
        attr[texts["</s>"]] = ATTR_NORMAL
    return eot_id, frozenset(eog)


def _model_attributes(meta: dict, pre: str | None, attr: np.ndarray, special_ids: list[int],
                      token_to_id: dict[str, int]) -> None:
    """LSTRIP / RSTRIP that llama.cpp sets by model name (after the special-token list)."""
    name = str(meta.get("general.name", "")).lower()
    arch = str(meta.get("general.architecture", ""))
    pre = str(pre or "")
    if (any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
            or any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3"))):
        if "<mask>" in token_to_id:
            attr[token_to_id["<mask>"]] |= ATTR_LSTRIP
    elif "phi-3" in name or "phi3" in name:
        attr[special_ids] |= ATTR_RSTRIP
        if "</s>" in token_to_id:
            attr[token_to_id["</s>"]] |= ATTR_RSTRIP
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in token_to_id:
                attr[token_to_id[t]] &= ~ATTR_RSTRIP
    elif "modern-bert" in name and "[MASK]" in token_to_id:
        attr[token_to_id["[MASK]"]] |= ATTR_LSTRIP
