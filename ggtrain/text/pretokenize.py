"""Byte-level BPE pre-tokenizers: the regex chain that `tokenizer.ggml.pre` selects, applied the
way llama.cpp's unicode.cpp applies it, so words split exactly where llama.cpp splits them.

How llama.cpp runs a chain (and so how we do): the text is a list of chunks (at first one);
each regex splits every chunk into its matches and the text between them. Five regexes have
hand-written splitters in llama.cpp (GPT-2, Llama 3, Qwen2, Qwen3.5, newlines); ours are in
ggtrain.kernels.pretok. The others run on std::regex: a regex with \\p{..} classes runs on a
"collapsed" text where every non-ASCII code point becomes one byte standing for its category
(\\p{L} -> 0xD2 ...) and non-ASCII whitespace becomes \\v; a regex without runs on the code
points with non-ASCII whitespace made \\v. Python's `re` on bytes (collapsed) or with re.ASCII
(code points) has the same ASCII-only \\s and \\d as std::regex in the C locale, so we do the same.

Character categories are llama.cpp's: Unicode 15.1 general categories (ggtrain.text.unicode_ranges,
Cn undefined, C* control, L* letter, M* mark, N* number, P* punctuation, S* symbol, Z* separator)
and its whitespace set.
"""

from __future__ import annotations

import re

import numpy as np

from ggtrain.errors import GGTrainError
from ggtrain.kernels.pretok import (
    KIND_GPT2,
    KIND_LLAMA3,
    KIND_NEWLINES,
    KIND_QWEN2,
    KIND_QWEN35,
    split_custom,
)
from ggtrain.text.unicode_ranges import category_flags

FLAG_UNDEFINED, FLAG_NUMBER, FLAG_LETTER, FLAG_SEPARATOR = 0x0001, 0x0002, 0x0004, 0x0008
FLAG_MARK, FLAG_PUNCTUATION, FLAG_SYMBOL, FLAG_CONTROL = 0x0010, 0x0020, 0x0040, 0x0080
FLAG_WHITESPACE = 0x0100

WHITESPACE = [*range(0x09, 0x0E), *range(0x2000, 0x200B), 0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F,
              0x205F, 0x3000]

_FLAGS = category_flags()  # uint16 (0x110000,), Unicode 15.1 like llama.cpp's tables
_FLAGS[WHITESPACE] |= FLAG_WHITESPACE


def cpt_flags(cpts: np.ndarray) -> np.ndarray:
    """Category flags of code points int64 (n,) -> uint16 (n,)."""
    return _FLAGS[cpts]


def codepoints(text: str) -> np.ndarray:
    """str -> int64 (n,) code points."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32).astype(np.int64)


# ---- the regex chain of each pre-tokenizer (llama-vocab.cpp, llm_tokenizer_bpe) -------------

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
LLAMA3 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
          "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
         "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN35 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*"
          "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
NEWLINES = "[^\\n]+|[\\n]+"
_CUSTOM = {GPT2: KIND_GPT2, LLAMA3: KIND_LLAMA3, QWEN2: KIND_QWEN2, QWEN35: KIND_QWEN35,
           NEWLINES: KIND_NEWLINES}

_DEEPSEEK_LLM = [
    "[\r\n]",
    ("\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"),
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
]
_DEEPSEEK_CODER = ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", "\\p{N}"]
_DEEPSEEK3 = [
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
     "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
]
_FALCON = ["[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2, "[0-9][0-9][0-9]"]
_STARCODER = ["\\p{N}", GPT2]
_DEFAULT = ["[\\p{P}\\$\\+<=>\\^~\\|]+", GPT2, "\\p{N}+", "[0-9][0-9][0-9]"]
_JAIS2 = [_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
          "|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\s{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)"
          "|\\s{8}(?!\\S)|\\s{4}(?!\\S)|\\s{1,2}(?!\\S)|\\s{1}"]
_PORO = [" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"]
_SEED_CODER = [_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]
_BAILINGMOE = [("'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
               "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+")]
_MINICPM5 = ["\\p{N}{1,3}", (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                                    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")]
_UFAKZEKA = ["[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]
_EXAONE_MOE = [_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}"
               "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"]
_UPPER = "((?=[\\p{L}])([^a-z]))"  # std::regex has no \p{Lu}: "a letter that is not a-z"
_LOWER = "((?=[\\p{L}])([^A-Z]))"
_TEKKEN = ["[^\\r\\n\\p{L}\\p{N}]?" + _UPPER + "*" + _LOWER + "+|[^\\r\\n\\p{L}\\p{N}]?" + _UPPER + "+" + _LOWER
           + "*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]
_GPT4O = ["[^\\r\\n\\p{L}\\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS + "?|[^\\r\\n\\p{L}\\p{N}]?"
          + _UPPER + "+" + _LOWER + "*" + _CONTRACTIONS + "?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
          "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"]

# tokenizer.ggml.pre -> (regex chain, ignore_merges, clean_spaces, add_bos forced on)
# (names and settings as llama.cpp's llama_vocab::impl::load maps them)
PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool, bool]] = {}


def _pre(names: str, chain: list[str], ignore_merges: bool = False, clean_spaces: bool = True,
         add_bos: bool = False) -> None:
    for name in names.split():
        PRE_TOKENIZERS[name] = (chain, ignore_merges, clean_spaces, add_bos)


_pre("default", _DEFAULT)
_pre("minicpm5", _MINICPM5, ignore_merges=True)
_pre("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", [LLAMA3],
     ignore_merges=True, add_bos=True)
_pre("deepseek-llm", _DEEPSEEK_LLM, clean_spaces=False)
_pre("deepseek-coder", _DEEPSEEK_CODER, clean_spaces=False)
_pre("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", _DEEPSEEK3, clean_spaces=False)
_pre("falcon", _FALCON)
_pre("mpt gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
     "jina-v1-en jina-v2-code roberta-bpe olmo jais exaone4", [GPT2])
_pre("trillion granite-docling", [GPT2], clean_spaces=False)
_pre("jais-2", _JAIS2)
_pre("starcoder refact codeshell exaone minerva-7b mellum2", _STARCODER)
_pre("command-r smollm", _STARCODER, clean_spaces=False)
_pre("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open grok-2", [QWEN2], clean_spaces=False)
_pre("stablelm2 megrez", [QWEN2])
_pre("laguna", [NEWLINES, QWEN2], clean_spaces=False)
_pre("qwen35", [QWEN35], clean_spaces=False)
_pre("dbrx smaug-bpe chatglm-bpe", [LLAMA3])
_pre("glm4 glm5", [LLAMA3], ignore_merges=True)
_pre("poro-chat", _PORO, clean_spaces=False)
_pre("bloom gpt3-finnish", _PORO)
_pre("viking", [*_PORO, "\\p{N}"], clean_spaces=False)
_pre("tekken", _TEKKEN, ignore_merges=True, clean_spaces=False, add_bos=True)
_pre("gpt-4o llama4 kanana2 talkie", _GPT4O, clean_spaces=False)
_pre("seed-coder", _SEED_CODER, clean_spaces=False)
_pre("bailingmoe bailingmoe2 llada-moe", _BAILINGMOE, clean_spaces=False)
_pre("ufakzeka", _UFAKZEKA, clean_spaces=False)
_pre("exaone-moe", _EXAONE_MOE, clean_spaces=False)


def pre_tokenizer(name: str | None, path: object) -> tuple[list[str], bool, bool, bool]:
    """The settings of a tokenizer.ggml.pre value (None -> 'default', as llama.cpp does)."""
    key = name or "default"
    if key not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise GGTrainError(f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre = '{name}' "
                           f"(supported: {known})")
    return PRE_TOKENIZERS[key]


# ---- std::regex emulation ----------------------------------------------------------------------

# \p{..} -> (placeholder byte of the category, the ASCII members of the category as a class body)
_UCAT = {
    "\\p{N}": (0xD1, b"0-9"),
    "\\p{L}": (0xD2, b"A-Za-z"),
    "\\p{Lu}": (0xD2, b"A-Za-z"), "\\p{Ll}": (0xD2, b"A-Za-z"), "\\p{Lt}": (0xD2, b"A-Za-z"),
    "\\p{Lm}": (0xD2, b"A-Za-z"), "\\p{Lo}": (0xD2, b"A-Za-z"),
    "\\p{P}": (0xD3, b"!-#%-*,-/:-;?-@\\[-\\]_\\{\\}"),
    "\\p{M}": (0xD4, b""),
    "\\p{S}": (0xD5, b"\\$\\+<->\\^`\\|~"),
}
_FLAG_PLACEHOLDER = {FLAG_NUMBER: 0xD1, FLAG_LETTER: 0xD2, FLAG_PUNCTUATION: 0xD3, FLAG_MARK: 0xD4,
                     FLAG_SYMBOL: 0xD5}
# collapsed byte of each category flag value (low 8 bits); others -> 0xD0
_COLLAPSE = np.full(256, 0xD0, dtype=np.uint8)
for _f, _b in _FLAG_PLACEHOLDER.items():
    _COLLAPSE[_f] = _b


def _uses_categories(regex: str) -> bool:
    return any(u in regex for u in _UCAT)


def _collapse_regex(regex: str) -> bytes:
    """Rewrite \\p{..} as byte classes over the collapsed text, as llama.cpp does."""
    out = bytearray()
    inside = False
    i = 0
    src = regex.encode()
    while i < len(src):
        c = src[i:i + 1]
        if c == b"[" and (i == 0 or src[i - 1:i] != b"\\"):
            out += b"["
            inside = True
            i += 1
            continue
        if inside and c == b"]" and src[i - 1:i] != b"\\":
            out += b"]"
            inside = False
            i += 1
            continue
        if src[i:i + 3] == b"\\p{":
            close = src.find(b"}", i + 3)
            if close != -1 and close <= i + 10:
                pat = src[i:close + 1].decode()
                if pat in _UCAT:
                    ph, ascii_class = _UCAT[pat]
                    body = re.escape(bytes([ph])) + ascii_class
                    out += body if inside else b"[" + body + b"]"
                    i = close + 1
                    continue
        out += c
        i += 1
    return bytes(out)


def _python_regex(regex: str | bytes) -> str | bytes:
    # ECMAScript '$' is the end of input only; Python's also matches before a final newline.
    # (Only a trailing, unescaped '$' occurs in the chains.)
    dollar, esc, end = ("$", "\\$", "\\Z") if isinstance(regex, str) else (b"$", b"\\$", b"\\Z")
    if regex.endswith(dollar) and not regex.endswith(esc):
        return regex[:-1] + end
    return regex


class _Splitter:
    """One regex of a chain, compiled once."""

    def __init__(self, regex: str):
        self.kind = _CUSTOM.get(regex, -1)
        self.collapsed = False
        if self.kind < 0:
            self.collapsed = _uses_categories(regex)
            if self.collapsed:
                self.pattern = re.compile(_python_regex(_collapse_regex(regex)))
            else:
                self.pattern = re.compile(_python_regex(regex), re.ASCII)

    def split(self, cpts: np.ndarray, flags: np.ndarray, lens: np.ndarray, views: dict) -> np.ndarray:
        if self.kind >= 0:
            return split_custom(cpts, flags, lens, self.kind)
        key = "collapsed" if self.collapsed else "wide"
        if key not in views:
            if self.collapsed:
                col = np.where(cpts < 128, cpts, _COLLAPSE[flags & 0xFF]).astype(np.uint8)
                col[(cpts >= 128) & ((flags & FLAG_WHITESPACE) != 0)] = 0x0B
                views[key] = col.tobytes()
            else:
                wide = np.where((cpts > 0x7F) & ((flags & FLAG_WHITESPACE) != 0), 0x0B, cpts)
                views[key] = wide.astype(np.uint32).tobytes().decode("utf-32-le", errors="surrogatepass")
        text = views[key]
        out: list[int] = []
        start = 0
        for n in lens.tolist():  # per chunk: matches and the text between them
            end = start + n
            prev = start
            for m in self.pattern.finditer(text, start, end):
                s, e = m.span()
                if s > prev:
                    out.append(s - prev)
                out.append(e - s)
                prev = e
            if prev < end:
                out.append(end - prev)
            start = end
        return np.asarray(out, dtype=np.int64)


class PreTokenizer:
    """Splits text into the words BPE merges within, for one tokenizer.ggml.pre value."""

    def __init__(self, regexes: list[str]):
        self.splitters = [_Splitter(r) for r in regexes]

    def split_cpts(self, cpts: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """Word lengths in code points int64 (k,) of code points cpts int64 (n,) with their flags."""
        lens = np.array([cpts.size], dtype=np.int64)
        views: dict = {}
        for sp in self.splitters:
            lens = sp.split(cpts, flags, lens, views)
        return lens

    def split(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """-> (utf-8 bytes uint8 (nb,), word end offsets in bytes int64 (k,))"""
        cpts = codepoints(text)
        data = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8)
        if cpts.size == 0:
            return data, np.zeros(0, dtype=np.int64)
        lens = self.split_cpts(cpts, cpt_flags(cpts))
        return data, utf8_offsets(cpts)[np.cumsum(lens)]


def utf8_offsets(cpts: np.ndarray) -> np.ndarray:
    """Byte offset of each code point in UTF-8, plus the total: int64 (n+1,)"""
    nbytes = np.where(cpts < 0x80, 1, np.where(cpts < 0x800, 2, np.where(cpts < 0x10000, 3, 4)))
    out = np.zeros(cpts.size + 1, dtype=np.int64)
    np.cumsum(nbytes, out=out[1:])
    return out
