"""Tokenizer built from a GGUF's own metadata, token for token what llama.cpp produces.

Two families (tokenizer.ggml.model):
- "llama": SentencePiece-style (Llama 2, Mistral, Gemma, Phi-3): scores, byte fallback (<0xXX>),
  optional space prefix; spaces become U+2581 and the best-scoring pairs merge first.
- "gpt2": byte-level BPE (Llama 3, Qwen2/3, GPT-2, DeepSeek, Command-R, ...): the pre-tokenizer
  chosen by tokenizer.ggml.pre splits words (ggtrain.text.pretokenize), merges apply by rank.

Before either, special tokens written in the text are cut out as llama.cpp's
tokenizer_st_partition does: longest text first; control and unknown tokens only when
parse_special, user-defined tokens always. The merge loops run in Numba (ggtrain.kernels.bpe).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

import numpy as np

from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.kernels import bpe as kb

# GGUF tokenizer.ggml.token_type values
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL = 0, 1, 2, 3
TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 4, 5, 6

# token attributes (bit flags, llama.h's llama_token_attr)
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL = 1 << 0, 1 << 1, 1 << 2, 1 << 3
ATTR_USER_DEFINED, ATTR_BYTE, ATTR_NORMALIZED = 1 << 4, 1 << 5, 1 << 6
ATTR_LSTRIP, ATTR_RSTRIP, ATTR_SINGLE_WORD = 1 << 7, 1 << 8, 1 << 9
_TYPE_TO_ATTR = {TYPE_UNKNOWN: ATTR_UNKNOWN, TYPE_UNUSED: ATTR_UNUSED, TYPE_NORMAL: ATTR_NORMAL,
                 TYPE_CONTROL: ATTR_CONTROL, TYPE_USER_DEFINED: ATTR_USER_DEFINED, TYPE_BYTE: ATTR_BYTE}

SPM, BPE = "spm", "bpe"
_SPACE = "\u2581"  # SentencePiece's visible space
_C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale

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


def _codepoints(text: str) -> np.ndarray:
    """str -> int64 (n,) code points."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32).astype(np.int64)


_GROUP_CHARS = 1 << 22  # characters of fragments per kernel call


def _groups(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive fragment ranges [a, b) of about _GROUP_CHARS characters each (at least one)."""
    if lengths.size == 0:
        return []
    gid = (np.cumsum(lengths) - 1) // _GROUP_CHARS
    cut = [0, *(np.flatnonzero(np.diff(gid)) + 1).tolist(), lengths.size]
    return list(itertools.pairwise(cut))


def _join(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def _meta_ids(meta: dict, key: str) -> int | None:
    v = meta.get(key)
    return int(v) if isinstance(v, (int, np.integer)) else None


class Tokenizer:
    """encode/decode exactly as llama.cpp (llama_tokenize / llama_detokenize) for one GGUF vocab.

    encode(text, add_special, parse_special) -> list[int]; encode_array (int32 array);
    encode_offsets (ids, start character of each token); decode(ids, special) -> str;
    decode_bytes; piece(id) / piece_bytes(id).
    n_vocab; bos_id, eos_id, eot_id, eom_id, unk_id, pad_id, sep_id (None when absent);
    eog_ids (end-of-generation set); add_bos, add_eos, add_space_prefix; kind ("spm" / "bpe");
    pre (tokenizer.ggml.pre); tokens (texts), token_to_id, scores, token_type (GGUF
    TYPE_* per token), attr (llama.cpp ATTR_* bits); is_control / is_user_defined / is_byte /
    is_eog; special_ids (tokens cut out of text, in llama.cpp's order).
    """

    def __init__(self, meta: dict, path: object = "<metadata>"):
        self.path = path
        self._read_vocab(meta)
        fim = self._read_settings(meta)
        self._auto_special(fim)
        # special tokens cut out of the text before tokenizing, longest first
        sp = np.flatnonzero(self.attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
        sp_len = np.array([len(self.tokens[i].encode()) for i in sp], dtype=np.int64)
        self.special_ids: list[int] = sp[np.argsort(-sp_len, kind="stable")].tolist()
        self._model_attributes(meta)
        self._build_tables()
        self._pieces: tuple[np.ndarray, np.ndarray] | None = None

    # -- construction ---------------------------------------------------------------------------
    def _read_vocab(self, meta: dict) -> None:
        """Tokens, scores, types -> attributes (llama_vocab::impl::load)."""
        path = self.path
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise GGTrainError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.model / "
                               f"tokenizer.ggml.tokens missing)")
        if model == "llama":
            self.kind = SPM
        elif model == "gpt2":
            self.kind = BPE
        else:
            raise GGTrainError(f"{path}: unsupported tokenizer.ggml.model '{model}' (supported: "
                               f"'llama' SentencePiece-style, 'gpt2' byte-level BPE)")
        n = len(tokens)
        # llama.cpp renames empty tokens so every text is unique-ish and non-empty
        self.tokens: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.n_vocab = n
        scores = meta.get("tokenizer.ggml.scores")
        self.scores = (np.zeros(n, dtype=np.float32) if scores is None
                       else np.asarray(scores, dtype=np.float32)[:n].copy())
        if len(self.scores) < n:
            raise GGTrainError(f"{path}: tokenizer.ggml.scores has {len(self.scores)} entries for {n} tokens")
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            self.token_type = np.full(n, TYPE_NORMAL, dtype=np.int32)
        else:
            self.token_type = np.asarray(types, dtype=np.int32)[:n].copy()
            if len(self.token_type) < n:
                raise GGTrainError(f"{path}: tokenizer.ggml.token_type has {len(self.token_type)} entries "
                                   f"for {n} tokens")
        attr = np.zeros(n, dtype=np.int32)
        for t, a in _TYPE_TO_ATTR.items():
            attr[self.token_type == t] = a
        attr[(self.token_type < 0) | (self.token_type > TYPE_BYTE)] = 0
        self.attr = attr
        self.token_to_id: dict[str, int] = dict(zip(self.tokens, range(n)))  # later duplicates win

    def _read_settings(self, meta: dict) -> list[int | None]:
        """Pre-tokenizer, add_bos/add_eos/space prefix, special ids; returns the FIM ids."""
        path, n = self.path, self.n_vocab
        self.pre = meta.get("tokenizer.ggml.pre")
        self.clean_spaces = False
        self.ignore_merges = False
        self.add_space_prefix = False
        if self.kind == SPM:
            bos, eos, unk = 1, 2, 0
            self.add_space_prefix, self.add_bos, self.add_eos = True, True, False
        else:
            from ggtrain.text.pretokenize import PreTokenizer, pre_tokenizer

            bos, eos, unk = 11, 11, None
            regexes, self.ignore_merges, self.clean_spaces, self.add_bos = pre_tokenizer(self.pre, path)
            self.add_eos = False
            self.pretokenizer = PreTokenizer(regexes)
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise GGTrainError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
            self._merge_list: list[str] = list(merges)
        if "tokenizer.ggml.add_space_prefix" in meta:
            self.add_space_prefix = bool(meta["tokenizer.ggml.add_space_prefix"])

        def special(key: str, default: int | None) -> int | None:
            if default is not None and default >= n:
                default = None
            v = _meta_ids(meta, f"tokenizer.ggml.{key}")
            return v if v is not None and 0 <= v < n else default

        self.bos_id = special("bos_token_id", bos)
        self.eos_id = special("eos_token_id", eos)
        self.unk_id = special("unknown_token_id", unk)
        self.eot_id = special("eot_token_id", None)
        self.eom_id = special("eom_token_id", None)
        self.sep_id = special("seperator_token_id", None)
        self.pad_id = special("padding_token_id", None)
        fim_keys = ("fim_pre_token_id", "fim_suf_token_id", "fim_mid_token_id", "fim_pad_token_id",
                    "fim_rep_token_id", "fim_sep_token_id")
        fim: list[int | None] = [special(k, None) for k in fim_keys]
        for i, old in enumerate(("prefix_token_id", "suffix_token_id", "middle_token_id")):
            fim[i] = special(old, fim[i])
        if "tokenizer.ggml.add_bos_token" in meta:
            self.add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_eos_token" in meta:
            self.add_eos = bool(meta["tokenizer.ggml.add_eos_token"])
        if self.add_bos and self.bos_id is None:
            raise GGTrainError(f"{path}: tokenizer adds a BOS token but has no BOS id")
        if self.add_eos and self.eos_id is None:
            raise GGTrainError(f"{path}: tokenizer adds an EOS token but has no EOS id")
        return fim

    def _auto_special(self, fim: list[int | None]) -> None:
        """Special tokens llama.cpp finds by their text: forced to control, end-of-generation set."""
        def mark(texts: Iterable[str]) -> int | None:
            for t in texts:
                i = self.token_to_id.get(t)
                if i is not None:
                    self.attr[i] |= ATTR_CONTROL
                    return i
            return None

        if self.eot_id is None:
            self.eot_id = mark(_EOT_TEXTS)
        if self.eom_id is None:
            self.eom_id = mark(_EOM_TEXTS)
        for i, texts in enumerate(_FIM_TEXTS):
            if fim[i] is None:
                fim[i] = mark(texts)
        self.fim_ids = fim
        control = (self.attr & ATTR_CONTROL) != 0
        unused = np.array(["unused" in t for t in np.asarray(self.tokens, dtype=object)[control]], dtype=bool)
        self.attr[np.flatnonzero(control)[unused]] |= ATTR_UNUSED
        eog = {i for i in (fim[3], fim[4], fim[5]) if i is not None}
        for t in _EOG_TEXTS:
            i = self.token_to_id.get(t)
            if i is not None:
                eog.add(i)
                self.attr[i] |= ATTR_CONTROL
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
            if t in self.token_to_id:
                self.attr[self.token_to_id[t]] = ATTR_USER_DEFINED
        eog |= {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}
        texts = {self.tokens[i]: i for i in eog}
        if ("<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                                    or ("<|calls|>" in texts and "<|flush|>" in texts))):
            eog.discard(texts["<|end|>"])
            self.attr[texts["<|end|>"]] = ATTR_USER_DEFINED
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            self.attr[texts["</s>"]] = ATTR_NORMAL
        self.eog_ids = frozenset(eog)

    def _model_attributes(self, meta: dict) -> None:
        """LSTRIP / RSTRIP that llama.cpp sets by model name (after the special-token list)."""
        name = str(meta.get("general.name", "")).lower()
        arch = str(meta.get("general.architecture", ""))
        pre = str(self.pre or "")
        if (any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
                or any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3"))):
            if "<mask>" in self.token_to_id:
                self.attr[self.token_to_id["<mask>"]] |= ATTR_LSTRIP
        elif "phi-3" in name or "phi3" in name:
            self.attr[self.special_ids] |= ATTR_RSTRIP
            if "</s>" in self.token_to_id:
                self.attr[self.token_to_id["</s>"]] |= ATTR_RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in self.token_to_id:
                    self.attr[self.token_to_id[t]] &= ~ATTR_RSTRIP
        elif "modern-bert" in name and "[MASK]" in self.token_to_id:
            self.attr[self.token_to_id["[MASK]"]] |= ATTR_LSTRIP

    @classmethod
    def from_model_file(cls, mf: ModelFile) -> Tokenizer:
        return cls(mf.metadata, mf.path)

    @staticmethod
    def _blob(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = [s.encode("utf-8", errors="surrogatepass") for s in strings]
        offs = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)), out=offs[1:])
        return np.frombuffer(b"".join(enc), dtype=np.uint8), offs

    def _build_tables(self) -> None:
        blob, offs = self._blob(self.tokens)
        if self.kind == SPM:
            self._blob_u8, self._offs = blob, offs
            valid = np.ones(self.n_vocab, dtype=np.bool_)
            self._table = kb.table_build(blob, offs, valid, kb.table_capacity(self.n_vocab))
            byte_tok = np.full(256, -1, dtype=np.int32)
            for b in range(256):
                i = self.token_to_id.get(f"<0x{b:02X}>")
                if i is None and b < 0x80:
                    i = self.token_to_id.get(chr(b))
                byte_tok[b] = -1 if i is None else i
            self._byte_tok = byte_tok
            self._space_left = kb.spm_space_left(blob, offs)
            return
        inv = np.full(512, -1, dtype=np.int64)
        for b, ch in bytes_to_unicode().items():
            inv[ord(ch)] = b
        raw_blob, raw_offs, raw_valid = kb.bpe_vocab_raw(blob, offs, inv)
        merges = self._merge_list
        if merges:
            mblob, moffs = self._blob(merges)
        else:
            mblob, moffs = np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
        (self._table, self._blob_u8, self._offs, _, self._pkeys, self._prank,
         self._pres) = kb.bpe_build(raw_blob, raw_offs, raw_valid, mblob, moffs, inv)
        byte_id = np.full(256, -1, dtype=np.int64)
        one = np.arange(256, dtype=np.uint8)
        for b in range(256):
            byte_id[b] = kb.table_find(self._table, self._blob_u8, self._offs, one, b, b + 1)
        self._byte_id = byte_id

    # -- attributes -----------------------------------------------------------------------------
    def is_control(self, i: int) -> bool:
        return bool(self.attr[i] & ATTR_CONTROL)

    def is_user_defined(self, i: int) -> bool:
        return bool(self.attr[i] & ATTR_USER_DEFINED)

    def is_byte(self, i: int) -> bool:
        return bool(self.attr[i] & ATTR_BYTE)

    def is_eog(self, i: int) -> bool:
        return i in self.eog_ids

    # -- encode ---------------------------------------------------------------------------------
    def _build_special_index(self) -> None:
        """Code points of the special tokens (priority order) and, to skip quickly the ones a
        text cannot contain, the distinct character pairs of each."""
        cps = [np.frombuffer(self.tokens[i].encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
               .astype(np.int64) for i in self.special_ids]
        ns = len(cps)
        self._sp_ids = np.asarray(self.special_ids, dtype=np.int32)
        self._sp_offs = np.zeros(ns + 1, dtype=np.int64)
        np.cumsum([len(c) for c in cps], out=self._sp_offs[1:])
        self._sp_cpts = np.concatenate(cps) if cps else np.zeros(0, dtype=np.int64)
        attr = self.attr[self._sp_ids]
        self._sp_strip = (((attr & ATTR_LSTRIP) != 0) * 1 + ((attr & ATTR_RSTRIP) != 0) * 2).astype(np.int32)
        self._sp_control = (attr & (ATTR_CONTROL | ATTR_UNKNOWN)) != 0
        keys, owner = [], []
        for j, c in enumerate(cps):  # a one-character token keys on (c, -1)
            k = np.unique(c[:-1] << 21 | c[1:]) if len(c) > 1 else (c[:1] << 21) | 0x1FFFFF
            keys.append(k)
            owner.append(np.full(len(k), j, dtype=np.int64))
        key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        own = np.concatenate(owner) if owner else np.zeros(0, dtype=np.int64)
        # keep each token's two rarest pairs (a necessary condition all the same): a text with
        # "<u" then does not drag in all 6000 "<unused..>" tokens of Gemma
        _, inv, freq = np.unique(key, return_inverse=True, return_counts=True)
        order = np.lexsort((freq[inv], own))
        key, own = key[order], own[order]
        first = np.searchsorted(own, own, side="left")
        keep = np.arange(own.size) - first < 2
        key, own = key[keep], own[keep]
        order = np.argsort(key, kind="stable")
        self._sp_key, self._sp_key_owner = key[order], own[order]
        self._sp_nkeys = np.bincount(own, minlength=ns)

    def _candidates(self, cpts: np.ndarray, parse_special: bool) -> np.ndarray:
        """Indexes (priority order) of the special tokens whose character pairs all occur in cpts."""
        if not hasattr(self, "_sp_key"):
            self._build_special_index()
        if self._sp_key.size == 0 or cpts.size == 0:
            return np.zeros(0, dtype=np.int64)
        text_keys = np.unique(np.concatenate([cpts[:-1] << 21 | cpts[1:], (cpts << 21) | 0x1FFFFF]))
        lo = np.searchsorted(self._sp_key, text_keys, side="left")
        hi = np.searchsorted(self._sp_key, text_keys, side="right")
        hit = hi > lo
        if not hit.any():
            return np.zeros(0, dtype=np.int64)
        lo, hi = lo[hit], hi[hit]
        cnt = hi - lo  # every key entry in [lo, hi) of each hit
        idx = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt - lo, cnt)
        found = np.bincount(self._sp_key_owner[idx], minlength=self._sp_nkeys.size)
        ok = found == self._sp_nkeys
        if not parse_special:
            ok &= ~self._sp_control
        return np.flatnonzero(ok)

    def _partition_cpts(self, cpts: np.ndarray, parse_special: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cand = self._candidates(cpts, parse_special)
        if cand.size == 0:
            n = cpts.size
            return (np.zeros(min(n, 1), dtype=np.int64), np.full(min(n, 1), n, dtype=np.int64),
                    np.full(min(n, 1), -1, dtype=np.int32))
        lens = self._sp_offs[cand + 1] - self._sp_offs[cand]
        offs = np.zeros(cand.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offs[1:])
        sel = np.concatenate([self._sp_cpts[self._sp_offs[j]:self._sp_offs[j + 1]] for j in cand])
        # where each distinct first character occurs: a token is only tried at those positions
        firsts, tok_first = np.unique(self._sp_cpts[self._sp_offs[cand]], return_inverse=True)
        where = [np.flatnonzero(cpts == c) for c in firsts.tolist()]
        first_offs = np.zeros(len(where) + 1, dtype=np.int64)
        np.cumsum([len(w) for w in where], out=first_offs[1:])
        return kb.st_partition(cpts, sel, offs, self._sp_ids[cand], self._sp_strip[cand],
                               np.concatenate(where), first_offs, tok_first.astype(np.int64))

    def partition(self, text: str, parse_special: bool) -> list[tuple[int, int] | int]:
        """Cut special tokens out of text: raw spans (start, end) in characters and token ids,
        as llama.cpp's tokenizer_st_partition does."""
        fs, fe, ft = self._partition_cpts(_codepoints(text), parse_special)
        return [int(t) if t >= 0 else (int(a), int(b)) for a, b, t in zip(fs, fe, ft)]

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of text, as llama.cpp's llama_tokenize(text, add_special, parse_special).

        add_special adds BOS / EOS where the model's metadata asks for them.
        parse_special turns control-token texts such as <start_of_turn> into their ids
        (user-defined tokens are always recognised, as in llama.cpp).
        """
        return self.encode_array(text, add_special, parse_special).tolist()

    def encode_array(self, text: str, add_special: bool = True, parse_special: bool = True) -> np.ndarray:
        """encode() as an int32 array."""
        return self._encode(text, add_special, parse_special, False)[0]

    def encode_offsets(self, text: str, add_special: bool = True, parse_special: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
        """encode() plus where each token starts in text: (ids int32 (n,), start int64 (n,)).

        Token i stands for text[start[i]:start[i+1]] (the last one up to len(text)); BOS starts at
        0, EOS at len(text). Byte tokens of one character all start at that character; whitespace
        a special token strips (LSTRIP/RSTRIP) belongs to the token before it. With these a loss
        mask is exact: token i is trained if its span lies in a trained part of the text.
        """
        return self._encode(text, add_special, parse_special, True)

    def _encode(self, text: str, add_special: bool, parse_special: bool, want_pos: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        cpts = _codepoints(text)
        fs, fe, ft = self._partition_cpts(cpts, parse_special)
        if self.kind == SPM:
            # spaces -> U+2581 (3 bytes); a fragment at the start or after a special token gets
            # the space prefix when add_space_prefix
            nbytes = np.where(cpts < 0x80, 1, np.where(cpts < 0x800, 2, np.where(cpts < 0x10000, 3, 4)))
            nbytes[cpts == 32] = 3
            at = np.zeros(cpts.size + 1, dtype=np.int64)
            np.cumsum(nbytes, out=at[1:])
            esc = np.frombuffer(text.replace(" ", _SPACE).encode("utf-8", errors="surrogatepass"),
                                dtype=np.uint8)
            prev_tok = np.concatenate([[True], ft[:-1] >= 0]) if ft.size else np.zeros(0, dtype=bool)
            prefix = (prev_tok & (ft < 0)) if self.add_space_prefix else np.zeros(ft.size, dtype=bool)
            # fragments are tokenized independently (as in llama.cpp): a few MB of them per kernel
            # call keeps the kernel's working arrays small on a huge text
            parts = [kb.spm_encode_fragments(esc, at[fs[a:b]], at[fe[a:b]], ft[a:b], prefix[a:b], self._table,
                                             self._blob_u8, self._offs, self.scores, self._byte_tok,
                                             self.n_vocab, self._space_left)
                     for a, b in _groups(fe - fs)]
            body, pos = _join(parts)
        else:
            from ggtrain.text.pretokenize import utf8_offsets

            at = utf8_offsets(cpts)
            body, pos = self._encode_bpe_fragments(text, cpts, at, fs, fe, ft)
        head = [self.bos_id] if add_special and self.add_bos else []
        tail = [self.eos_id] if add_special and self.add_eos else []
        start = np.searchsorted(at, pos, side="right") - 1 if want_pos else pos
        if head or tail:
            body = np.concatenate([np.asarray(head, dtype=np.int32), body, np.asarray(tail, dtype=np.int32)])
            start = np.concatenate([np.zeros(len(head), dtype=np.int64), start,
                                    np.full(len(tail), len(text), dtype=np.int64)])
        return body, start

    def _encode_bpe_fragments(self, text: str, cpts: np.ndarray, at: np.ndarray, fs: np.ndarray,
                              fe: np.ndarray, ft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from ggtrain.text.pretokenize import cpt_flags

        data = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8)
        flags = cpt_flags(cpts) if cpts.size else np.zeros(0, dtype=np.uint16)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for a, b in _groups(fe - fs):  # a few MB of fragments per kernel call
            ends: list[np.ndarray] = []
            toks: list[np.ndarray] = []
            for s, e, t in zip(fs[a:b].tolist(), fe[a:b].tolist(), ft[a:b].tolist()):  # fragments
                if t >= 0:
                    ends.append(np.array([at[e]], dtype=np.int64))
                    toks.append(np.array([t], dtype=np.int32))
                else:
                    lens = self.pretokenizer.split_cpts(cpts[s:e], flags[s:e])
                    ends.append(at[s + np.cumsum(lens)])
                    toks.append(np.full(lens.size, -1, dtype=np.int32))
            out.append(kb.bpe_encode(data, at[fs[a]], np.concatenate(ends), np.concatenate(toks), self._table,
                                     self._blob_u8, self._offs, self.n_vocab, self._pkeys, self._prank,
                                     self._pres, self._byte_id, self.ignore_merges))
        return _join(out)

    # -- decode ---------------------------------------------------------------------------------
    def _pieces_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token's bytes as llama.cpp's token_to_piece(special=true) renders them, in one
        blob: (pieces uint8, offsets int64 (n_vocab+1,)). Built once, on first use."""
        if self._pieces is not None:
            return self._pieces
        attr = self.attr
        raw = (attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED)) != 0
        normal = ~raw & ((attr & ATTR_NORMAL) != 0)
        byte = ~raw & ~normal & ((attr & ATTR_BYTE) != 0)
        how = np.full(self.n_vocab, kb.PIECE_EMPTY, dtype=np.int64)
        how[raw] = kb.PIECE_RAW
        how[normal] = kb.PIECE_SPM if self.kind == SPM else kb.PIECE_BPE
        how[byte] = kb.PIECE_BYTE
        blob, offs = self._blob(self.tokens)
        inv = np.full(512, -1, dtype=np.int64)
        for b, ch in bytes_to_unicode().items():
            inv[ord(ch)] = b
        pieces, poffs, failed = kb.piece_blob(blob, offs, how, inv)
        if failed.any():  # llama_decode_text's [UNK_BYTE_0x..] for characters outside the byte map
            parts = [pieces[poffs[i]:poffs[i + 1]].tobytes() for i in range(self.n_vocab)]
            for i in np.flatnonzero(failed).tolist():
                parts[i] = self._decode_text_slow(self.tokens[i], inv)
            pieces, poffs = self._blob_bytes(parts)
        self._pieces = (pieces, poffs)
        return self._pieces

    @staticmethod
    def _blob_bytes(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        offs = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=offs[1:])
        return np.frombuffer(b"".join(parts), dtype=np.uint8), offs

    @staticmethod
    def _decode_text_slow(text: str, inv: np.ndarray) -> bytes:
        out = bytearray()
        for ch in text:
            c = ord(ch)
            if c < inv.size and inv[c] >= 0:
                out.append(int(inv[c]))
            else:
                out += b"[UNK_BYTE_0x" + ch.encode("utf-8", "surrogatepass").hex().encode() + text.encode() + b"]"
        return bytes(out)

    def piece_bytes(self, i: int, special: bool = True) -> bytes:
        """The bytes token i stands for (llama_token_to_piece); control tokens are empty
        unless special."""
        if not special and self.attr[i] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        pieces, offs = self._pieces_table()
        return pieces[offs[i]:offs[i + 1]].tobytes()

    def piece(self, i: int, special: bool = True) -> str:
        """Token i as text (invalid UTF-8 of a partial character shows as U+FFFD)."""
        return self.piece_bytes(i, special).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], special: bool = True, clean_up: bool | None = None) -> bytes:
        """llama_detokenize(ids, remove_special=false, unparse_special=special).

        clean_up: llama.cpp's clean-up of spaces before punctuation and contractions, which the
        model's pre-tokenizer turns on or off (None: as the model says; False: exact pieces).
        """
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise GGTrainError(f"token id {bad} is out of range (vocabulary of {self.n_vocab})")
        pieces, offs = self._pieces_table()
        first_shown = ids.size > 0
        if not special:
            shown = (self.attr[ids] & (ATTR_UNKNOWN | ATTR_CONTROL)) == 0
            first_shown = ids.size > 0 and bool(shown[0])
            ids = ids[shown]
        # gather every piece's bytes at once: (total,) indexes into the blob
        lens = offs[ids + 1] - offs[ids]
        idx = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(offs[ids] - (np.cumsum(lens) - lens), lens)
        text = pieces[idx].tobytes()
        if first_shown and self.add_space_prefix and text[:1] == b" " and lens[0] > 0:
            text = text[1:]  # the space prefix added when encoding (only off the first token)
        if self.clean_spaces if clean_up is None else clean_up:
            text = re.sub(rb" ([?!.,])", rb"\1", text)
            text = re.sub(rb" ' ", rb"'", text)
            text = re.sub(rb" '(?=[sm]|re|ve)", rb"'", text)
        return text

    def decode(self, ids: Iterable[int], special: bool = True, clean_up: bool | None = None) -> str:
        """Text of token ids, as llama.cpp detokenizes them (special: render control tokens)."""
        return self.decode_bytes(ids, special, clean_up).decode("utf-8", errors="replace")

