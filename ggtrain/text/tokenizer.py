"""Tokenizer over a GGUF's vocabulary (ggtrain.text.vocab), token for token what llama.cpp produces.

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
from typing import Any

import numpy as np

from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.kernels import bpe as kb
from ggtrain.text.pretokenize import PreTokenizer, codepoints, cpt_flags, utf8_offsets
from ggtrain.text.vocab import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_NORMAL,
    ATTR_RSTRIP,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    BPE,
    SPM,
    Vocab,
)

_SPACE = "\u2581"  # SentencePiece's visible space

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


def _unicode_to_byte() -> np.ndarray:
    """bytes_to_unicode inverted as a table: code point (< 512) -> byte, -1 elsewhere."""
    inv = np.full(512, -1, dtype=np.int64)
    for b, ch in bytes_to_unicode().items():
        inv[ord(ch)] = b
    return inv


def _blob_bytes(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings end to end: (blob uint8, offsets int64 (n+1,))."""
    offs = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=offs[1:])
    return np.frombuffer(b"".join(parts), dtype=np.uint8), offs


def _blob(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _blob_bytes([s.encode("utf-8", errors="surrogatepass") for s in strings])


class Tokenizer:
    """encode/decode exactly as llama.cpp (llama_tokenize / llama_detokenize) for one GGUF vocab.

    encode(text, add_special, parse_special) -> list[int]; encode_array (int32 array);
    encode_offsets (ids, start character of each token); decode(ids, special) -> str;
    decode_bytes; piece(id) / piece_bytes(id). `vocab` is the Vocab it encodes with, and its fields
    read through the tokenizer too: n_vocab, bos_id, eos_id, eot_id, eog_ids, add_bos, add_eos,
    add_space_prefix, kind, pre, tokens, token_to_id, scores, attr, special_ids, is_control /
    is_user_defined / is_byte / is_eog.
    """

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.pretokenizer = PreTokenizer(vocab.pre_regexes) if vocab.kind == BPE else None
        self._build_tables()
        self._pieces: tuple[np.ndarray, np.ndarray] | None = None

    def __getattr__(self, name: str) -> Any:
        # only called for what the tokenizer itself lacks: the vocabulary's fields (bos_id, attr, ...)
        vocab = self.__dict__.get("vocab")
        if vocab is None or name.startswith("_"):
            raise AttributeError(f"'Tokenizer' object has no attribute '{name}'")
        return getattr(vocab, name)

    @classmethod
    def from_model_file(cls, mf: ModelFile) -> Tokenizer:
        return cls(Vocab.from_model_file(mf))

    # -- construction ---------------------------------------------------------------------------
    def _build_tables(self) -> None:
        v = self.vocab
        blob, offs = _blob(v.tokens)
        if v.kind == SPM:
            self._blob_u8, self._offs = blob, offs
            valid = np.ones(v.n_vocab, dtype=np.bool_)
            self._table = kb.table_build(blob, offs, valid, kb.table_capacity(v.n_vocab))
            byte_tok = np.full(256, -1, dtype=np.int32)
            for b in range(256):
                i = v.token_to_id.get(f"<0x{b:02X}>")
                if i is None and b < 0x80:
                    i = v.token_to_id.get(chr(b))
                byte_tok[b] = -1 if i is None else i
            self._byte_tok = byte_tok
            self._space_left = kb.spm_space_left(blob, offs)
            return
        inv = _unicode_to_byte()
        raw_blob, raw_offs, raw_valid = kb.bpe_vocab_raw(blob, offs, inv)
        if v.merges:
            mblob, moffs = _blob(v.merges)
        else:
            mblob, moffs = np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
        (self._table, self._blob_u8, self._offs, _, self._pkeys, self._prank,
         self._pres) = kb.bpe_build(raw_blob, raw_offs, raw_valid, mblob, moffs, inv)
        byte_id = np.full(256, -1, dtype=np.int64)
        one = np.arange(256, dtype=np.uint8)
        for b in range(256):
            byte_id[b] = kb.table_find(self._table, self._blob_u8, self._offs, one, b, b + 1)
        self._byte_id = byte_id

    # -- encode ---------------------------------------------------------------------------------
    def _build_special_index(self) -> None:
        """Code points of the special tokens (priority order) and, to skip quickly the ones a
        text cannot contain, the distinct character pairs of each."""
        v = self.vocab
        cps = [codepoints(v.tokens[i]) for i in v.special_ids]
        ns = len(cps)
        self._sp_ids = np.asarray(v.special_ids, dtype=np.int32)
        self._sp_offs = np.zeros(ns + 1, dtype=np.int64)
        np.cumsum([len(c) for c in cps], out=self._sp_offs[1:])
        self._sp_cpts = np.concatenate(cps) if cps else np.zeros(0, dtype=np.int64)
        attr = v.attr[self._sp_ids]
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

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of text, as llama.cpp's llama_tokenize(text, add_special, parse_special).

        add_special adds BOS / EOS where the model's metadata asks for them.
        parse_special turns control-token texts such as <start_of_turn> into their ids
        (user-defined tokens are always recognised, as in llama.cpp).
        """
        return self.encode_array(text, add_special, parse_special).tolist()

    def encode_array(self, text: str, add_special: bool = True, parse_special: bool = True) -> np.ndarray:
        """encode() as an int32 array."""
        head, tail = self._bos_eos(add_special)
        body = self._encode_fragments(text, parse_special)[0]
        return np.concatenate([head, body, tail]) if head.size or tail.size else body

    def encode_offsets(self, text: str, add_special: bool = True, parse_special: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
        """encode() plus where each token starts in text: (ids int32 (n,), start int64 (n,)).

        Token i stands for text[start[i]:start[i+1]] (the last one up to len(text)); BOS starts at
        0, EOS at len(text). Byte tokens of one character all start at that character; whitespace
        a special token strips (LSTRIP/RSTRIP) belongs to the token before it. With these a loss
        mask is exact: token i is trained if its span lies in a trained part of the text.
        """
        head, tail = self._bos_eos(add_special)
        body, pos, at = self._encode_fragments(text, parse_special)
        start = np.searchsorted(at, pos, side="right") - 1  # the character holding each start byte
        return (np.concatenate([head, body, tail]),
                np.concatenate([np.zeros(head.size, dtype=np.int64), start,
                                np.full(tail.size, len(text), dtype=np.int64)]))

    def _bos_eos(self, add_special: bool) -> tuple[np.ndarray, np.ndarray]:
        """The ids encode puts before and after the text: BOS / EOS where the metadata asks for them."""
        v = self.vocab
        head = [v.bos_id] if add_special and v.add_bos else []
        tail = [v.eos_id] if add_special and v.add_eos else []
        return np.asarray(head, dtype=np.int32), np.asarray(tail, dtype=np.int32)

    def _encode_fragments(self, text: str, parse_special: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The text's tokens without BOS / EOS: (ids int32 (n,), the byte each starts at int64 (n,),
        the byte offset of each character int64 (len(text)+1,)), bytes of the UTF-8 the kernels
        read (for SPM, with spaces as U+2581)."""
        v = self.vocab
        cpts = codepoints(text)
        fs, fe, ft = self._partition_cpts(cpts, parse_special)
        if v.kind == SPM:
            # spaces -> U+2581 (3 bytes); a fragment at the start or after a special token gets
            # the space prefix when add_space_prefix
            at = utf8_offsets(np.where(cpts == 32, ord(_SPACE), cpts))
            esc = np.frombuffer(text.replace(" ", _SPACE).encode("utf-8", errors="surrogatepass"),
                                dtype=np.uint8)
            prev_tok = np.concatenate([[True], ft[:-1] >= 0]) if ft.size else np.zeros(0, dtype=bool)
            prefix = (prev_tok & (ft < 0)) if v.add_space_prefix else np.zeros(ft.size, dtype=bool)
            # fragments are tokenized independently (as in llama.cpp): a few MB of them per kernel
            # call keeps the kernel's working arrays small on a huge text
            parts = [kb.spm_encode_fragments(esc, at[fs[a:b]], at[fe[a:b]], ft[a:b], prefix[a:b], self._table,
                                             self._blob_u8, self._offs, v.scores, self._byte_tok,
                                             v.n_vocab, self._space_left)
                     for a, b in _groups(fe - fs)]
            body, pos = _join(parts)
        else:
            at = utf8_offsets(cpts)
            body, pos = self._encode_bpe_fragments(text, cpts, at, fs, fe, ft)
        return body, pos, at

    def _encode_bpe_fragments(self, text: str, cpts: np.ndarray, at: np.ndarray, fs: np.ndarray,
                              fe: np.ndarray, ft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = self.vocab
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
                                     self._blob_u8, self._offs, v.n_vocab, self._pkeys, self._prank,
                                     self._pres, self._byte_id, v.ignore_merges))
        return _join(out)

    # -- decode ---------------------------------------------------------------------------------
    def _pieces_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token's bytes as llama.cpp's token_to_piece(special=true) renders them, in one
        blob: (pieces uint8, offsets int64 (n_vocab+1,)). Built once, on first use."""
        if self._pieces is not None:
            return self._pieces
        v = self.vocab
        attr = v.attr
        raw = (attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED)) != 0
        normal = ~raw & ((attr & ATTR_NORMAL) != 0)
        byte = ~raw & ~normal & ((attr & ATTR_BYTE) != 0)
        how = np.full(v.n_vocab, kb.PIECE_EMPTY, dtype=np.int64)
        how[raw] = kb.PIECE_RAW
        how[normal] = kb.PIECE_SPM if v.kind == SPM else kb.PIECE_BPE
        how[byte] = kb.PIECE_BYTE
        blob, offs = _blob(v.tokens)
        inv = _unicode_to_byte()
        pieces, poffs, failed = kb.piece_blob(blob, offs, how, inv)
        if failed.any():  # llama_decode_text's [UNK_BYTE_0x..] for characters outside the byte map
            parts = [pieces[poffs[i]:poffs[i + 1]].tobytes() for i in range(v.n_vocab)]
            for i in np.flatnonzero(failed).tolist():
                parts[i] = self._decode_text_slow(v.tokens[i], inv)
            pieces, poffs = _blob_bytes(parts)
        self._pieces = (pieces, poffs)
        return self._pieces

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
        if not special and self.vocab.attr[i] & (ATTR_UNKNOWN | ATTR_CONTROL):
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
        v = self.vocab
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= v.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= v.n_vocab)][0])
            raise GGTrainError(f"token id {bad} is out of range (vocabulary of {v.n_vocab})")
        pieces, offs = self._pieces_table()
        first_shown = ids.size > 0
        if not special:
            shown = (v.attr[ids] & (ATTR_UNKNOWN | ATTR_CONTROL)) == 0
            first_shown = ids.size > 0 and bool(shown[0])
            ids = ids[shown]
        # gather every piece's bytes at once: (total,) indexes into the blob
        lens = offs[ids + 1] - offs[ids]
        idx = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(offs[ids] - (np.cumsum(lens) - lens), lens)
        text = pieces[idx].tobytes()
        if first_shown and v.add_space_prefix and text[:1] == b" " and lens[0] > 0:
            text = text[1:]  # the space prefix added when encoding (only off the first token)
        if v.clean_spaces if clean_up is None else clean_up:
            text = re.sub(rb" ([?!.,])", rb"\1", text)
            text = re.sub(rb" ' ", rb"'", text)
            text = re.sub(rb" '(?=[sm]|re|ve)", rb"'", text)
        return text

    def decode(self, ids: Iterable[int], special: bool = True, clean_up: bool | None = None) -> str:
        """Text of token ids, as llama.cpp detokenizes them (special: render control tokens)."""
        return self.decode_bytes(ids, special, clean_up).decode("utf-8", errors="replace")

