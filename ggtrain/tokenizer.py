"""Tokenizer built from a GGUF's own metadata, token for token what llama.cpp produces.

Two families (tokenizer.ggml.model):
- "llama": SentencePiece-style (Llama 2, Mistral, Gemma, Phi-3): scores, byte fallback (<0xXX>),
  optional space prefix; spaces become U+2581 and the best-scoring pairs merge first.
- "gpt2": byte-level BPE (Llama 3, Qwen2/3, GPT-2, DeepSeek, Command-R, ...): the pre-tokenizer
  chosen by tokenizer.ggml.pre splits words (ggtrain.pretokenize), merges apply by rank.

Before either, special tokens written in the text are cut out as llama.cpp's
tokenizer_st_partition does: longest text first; control and unknown tokens only when
parse_special, user-defined tokens always. The merge loops run in Numba (ggtrain.kernels.bpe).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from ggtrain.errors import GGTrainError
from ggtrain.kernels import bpe as kb
from ggtrain.modelfile import ModelFile

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
    """encode/decode exactly as llama.cpp (llama_tokenize / llama_detokenize) for one GGUF vocab."""

    def __init__(self, meta: dict, path: object = "<metadata>"):
        self.path = path
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

        self.pre = meta.get("tokenizer.ggml.pre")
        self.clean_spaces = False
        self.ignore_merges = False
        self.add_space_prefix = False
        if self.kind == SPM:
            bos, eos, unk = 1, 2, 0
            self.add_space_prefix, self.add_bos, self.add_eos = True, True, False
        else:
            from ggtrain.pretokenize import PreTokenizer, pre_tokenizer

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

        # special tokens found by their text (llama.cpp's auto-detection), forced to control
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

        # special tokens cut out of the text before tokenizing, longest first
        sp = np.flatnonzero(self.attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
        sp_len = np.array([len(self.tokens[i].encode()) for i in sp], dtype=np.int64)
        self.special_ids: list[int] = sp[np.argsort(-sp_len, kind="stable")].tolist()

        # per-model attributes llama.cpp sets by name
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

        self._build_tables()
        self._pieces: list[bytes] | None = None

    # -- construction ---------------------------------------------------------------------------
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
    def partition(self, text: str, parse_special: bool) -> list[tuple[int, int] | int]:
        """Cut special tokens out of text: a list of raw spans (start, end) and token ids."""
        frags: list[tuple[int, int] | int] = [(0, len(text))] if text else []
        for sid in self.special_ids:
            a = int(self.attr[sid])
            if not parse_special and a & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            t = self.tokens[sid]
            if t not in text:
                continue
            lstrip, rstrip = a & ATTR_LSTRIP, a & ATTR_RSTRIP
            out: list[tuple[int, int] | int] = []
            for fr in frags:
                if isinstance(fr, int):
                    out.append(fr)
                    continue
                pos, end = fr
                while True:
                    m = text.find(t, pos, end)
                    if m < 0:
                        break
                    left = m
                    if lstrip:
                        while left > pos and text[left - 1] in _C_SPACE:
                            left -= 1
                    if left > pos:
                        out.append((pos, left))
                    out.append(sid)
                    pos = m + len(t)
                    if rstrip:
                        while pos < end and text[pos] in _C_SPACE:
                            pos += 1
                if pos < end:
                    out.append((pos, end))
            frags = out
        return frags

    def _encode_spm(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.replace(" ", _SPACE).encode("utf-8", errors="surrogatepass"), dtype=np.uint8)
        return kb.spm_encode(data, self._table, self._blob_u8, self._offs, self.scores, self._byte_tok,
                             self.n_vocab)

    def _encode_bpe(self, text: str) -> np.ndarray:
        data, ends = self.pretokenizer.split(text)
        return kb.bpe_encode(data, ends, self._table, self._blob_u8, self._offs, self.n_vocab,
                             self._pkeys, self._prank, self._pres, self._byte_id, self.ignore_merges)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of text, as llama.cpp's llama_tokenize(text, add_special, parse_special).

        add_special adds BOS / EOS where the model's metadata asks for them.
        parse_special turns control-token texts such as <start_of_turn> into their ids.
        """
        return self.encode_array(text, add_special, parse_special).tolist()

    def encode_array(self, text: str, add_special: bool = True, parse_special: bool = True) -> np.ndarray:
        """encode() as an int32 array."""
        parts: list[np.ndarray] = []
        if add_special and self.add_bos:
            parts.append(np.array([self.bos_id], dtype=np.int32))
        prev_special = True  # SentencePiece adds the space prefix at the start and after a special token
        for fr in self.partition(text, parse_special):
            if isinstance(fr, int):
                parts.append(np.array([fr], dtype=np.int32))
                prev_special = True
                continue
            piece = text[fr[0]:fr[1]]
            if self.kind == SPM:
                if self.add_space_prefix and prev_special:
                    piece = " " + piece
                parts.append(self._encode_spm(piece))
            else:
                parts.append(self._encode_bpe(piece))
            prev_special = False
        if add_special and self.add_eos:
            parts.append(np.array([self.eos_id], dtype=np.int32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    # -- decode ---------------------------------------------------------------------------------
    def _piece_bytes(self) -> list[bytes]:
        """Every token's text as llama.cpp's token_to_piece(special=true) renders it."""
        if self._pieces is not None:
            return self._pieces
        toks = self.tokens
        attr = self.attr
        raw = (attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED)) != 0
        normal = ~raw & ((attr & ATTR_NORMAL) != 0)
        byte = ~raw & ~normal & ((attr & ATTR_BYTE) != 0)
        pieces: list[bytes] = [b""] * self.n_vocab
        for i in np.flatnonzero(raw).tolist():
            pieces[i] = toks[i].encode("utf-8", errors="surrogatepass")
        idx = np.flatnonzero(normal).tolist()
        if self.kind == SPM:
            for i in idx:
                pieces[i] = toks[i].replace(_SPACE, " ").encode("utf-8", errors="surrogatepass")
        else:
            table = {ord(ch): chr(b) for b, ch in bytes_to_unicode().items()}
            for i in idx:
                try:
                    pieces[i] = toks[i].translate(table).encode("latin-1")
                except UnicodeEncodeError:
                    pieces[i] = self._decode_text_slow(toks[i], table)
        for i in np.flatnonzero(byte).tolist():
            pieces[i] = bytes([int(toks[i][3:5], 16)])
        self._pieces = pieces
        return pieces

    @staticmethod
    def _decode_text_slow(text: str, table: dict[int, str]) -> bytes:
        # llama_decode_text: a character outside the byte map is written as [UNK_BYTE_0x..text]
        out = bytearray()
        for ch in text:
            if ord(ch) in table:
                out.append(ord(table[ord(ch)]))
            else:
                out += b"[UNK_BYTE_0x" + ch.encode().hex().encode() + text.encode() + b"]"
        return bytes(out)

    def piece_bytes(self, i: int, special: bool = True) -> bytes:
        """The bytes token i stands for (llama_token_to_piece); control tokens are empty
        unless special."""
        if not special and self.attr[i] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        return self._piece_bytes()[i]

    def piece(self, i: int, special: bool = True) -> str:
        """Token i as text (invalid UTF-8 of a partial character shows as U+FFFD)."""
        return self.piece_bytes(i, special).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], special: bool = True) -> bytes:
        """llama_detokenize(ids, remove_special=false, unparse_special=special)."""
        ids = [int(i) for i in ids]
        if any(i < 0 or i >= self.n_vocab for i in ids):
            bad = next(i for i in ids if i < 0 or i >= self.n_vocab)
            raise GGTrainError(f"token id {bad} is out of range (vocabulary of {self.n_vocab})")
        pieces = self._piece_bytes()
        if not special:
            hidden = (self.attr & (ATTR_UNKNOWN | ATTR_CONTROL)) != 0
            parts = [b"" if hidden[i] else pieces[i] for i in ids]
        else:
            parts = list(map(pieces.__getitem__, ids))
        if parts and self.add_space_prefix and parts[0].startswith(b" "):
            parts[0] = parts[0][1:]  # the space prefix added when encoding
        text = b"".join(parts)
        if self.clean_spaces:
            text = re.sub(rb" ([?!.,])", rb"\1", text)
            text = re.sub(rb" ' ", rb"'", text)
            text = re.sub(rb" '(?=[sm]|re|ve)", rb"'", text)
        return text

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of token ids, as llama.cpp detokenizes them (special: render control tokens)."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")


def load_tokenizer(mf: ModelFile) -> Tokenizer:
    """Tokenizer.from_model_file, for symmetry with the other loaders."""
    return Tokenizer.from_model_file(mf)
