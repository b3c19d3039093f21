"""Pre-tokenizer splitters (Numba) for the regexes llama.cpp hand-codes in unicode.cpp:
GPT-2's, Llama 3's, Qwen2's, Qwen3.5's and the newline split. They walk code points with
per-code-point category flags and reproduce llama.cpp's splitting, quirks included (e.g. a
code point past the end of a chunk has no flags, so `\\s+(?!\\S)` keeps the last space only
when more text follows).

Input: cpts int64 (n,), flags uint16 (n,) (ggtrain.text.pretokenize's FLAG_* bits), lens int64 (k,)
chunk lengths in code points summing to n. Output: int64 (k',) the new chunk lengths.
"""

from __future__ import annotations

import numpy as np
from numba import njit

F_NUMBER, F_LETTER, F_MARK, F_WHITESPACE = 0x0002, 0x0004, 0x0010, 0x0100

KIND_GPT2, KIND_LLAMA3, KIND_QWEN2, KIND_QWEN35, KIND_NEWLINES = 0, 1, 2, 3, 4


@njit(cache=True, inline="always")
def _fl(flags, pos, ini, end):
    return np.int64(flags[pos]) if ini <= pos < end else np.int64(0)


@njit(cache=True, inline="always")
def _cp(cpts, pos, ini, end):
    return cpts[pos] if ini <= pos < end else np.int64(-1)


@njit(cache=True, inline="always")
def _lower(c):
    return c + 32 if 65 <= c <= 90 else c


@njit(cache=True)
def split_custom(cpts, flags, lens, kind):
    out = np.empty(cpts.shape[0] + lens.shape[0], dtype=np.int64)
    k = 0
    start = 0
    for c in range(lens.shape[0]):
        ini = start
        end = start + lens[c]
        start = end
        prev_end = ini
        pos = ini
        while pos < end:
            cpt = cpts[pos]
            f = np.int64(flags[pos])
            new_end = -1
            if kind == KIND_NEWLINES:
                is_nl = cpt == 10
                while pos < end and (cpts[pos] == 10) == is_nl:
                    pos += 1
                new_end = pos
            else:
                # 's|'t|'re|'ve|'m|'ll|'d  (case-insensitive except for GPT-2)
                if cpt == 39 and pos + 1 < end:
                    n1 = cpts[pos + 1]
                    if kind != KIND_GPT2:
                        n1 = _lower(n1)
                    if n1 == 115 or n1 == 116 or n1 == 109 or n1 == 100:
                        new_end = pos + 2
                    elif pos + 2 < end:
                        n2 = cpts[pos + 2]
                        if kind != KIND_GPT2:
                            n2 = _lower(n2)
                        if (n1 == 114 and n2 == 101) or (n1 == 118 and n2 == 101) or (n1 == 108 and n2 == 108):
                            new_end = pos + 3
                if new_end < 0 and kind == KIND_GPT2:
                    f2 = _fl(flags, pos + 1, ini, end) if cpt == 32 else f
                    if f2 & F_LETTER:  # ' ?\p{L}+'
                        p = pos + (1 if cpt == 32 else 0)
                        while _fl(flags, p, ini, end) & F_LETTER:
                            p += 1
                        new_end = p
                    elif f2 & F_NUMBER:  # ' ?\p{N}+'
                        p = pos + (1 if cpt == 32 else 0)
                        while _fl(flags, p, ini, end) & F_NUMBER:
                            p += 1
                        new_end = p
                    elif not (f2 & (F_WHITESPACE | F_LETTER | F_NUMBER)) and f2 != 0:  # ' ?[^\s\p{L}\p{N}]+'
                        p = pos + (1 if cpt == 32 else 0)
                        while True:
                            g = _fl(flags, p, ini, end)
                            if (g & (F_WHITESPACE | F_LETTER | F_NUMBER)) or g == 0:
                                break
                            p += 1
                        new_end = p
                    else:
                        nws = 0
                        while _fl(flags, pos + nws, ini, end) & F_WHITESPACE:
                            nws += 1
                        if nws > 1 and pos + nws < end:  # '\s+(?!\S)'
                            new_end = pos + nws - 1
                        elif nws > 0:
                            new_end = pos + nws
                        else:
                            new_end = pos + 1
                elif new_end < 0:
                    letter = F_LETTER | F_MARK if kind == KIND_QWEN35 else F_LETTER
                    # '[^\r\n\p{L}\p{N}]?\p{L}+' ([\p{L}\p{M}]+ for Qwen3.5)
                    if not (cpt == 13 or cpt == 10 or (f & F_NUMBER)) and (
                            (f & letter) or (_fl(flags, pos + 1, ini, end) & letter)):
                        p = pos + 1
                        while _fl(flags, p, ini, end) & letter:
                            p += 1
                        new_end = p
                    if new_end < 0 and (f & F_NUMBER):
                        if kind == KIND_LLAMA3:  # '\p{N}{1,3}': groups of three, rest after
                            p = pos
                            g0 = pos
                            while _fl(flags, p, ini, end) & F_NUMBER:
                                p += 1
                                if p - g0 >= 3:
                                    out[k] = p - prev_end
                                    k += 1
                                    prev_end = p
                                    g0 = p
                            new_end = p
                        else:  # '\p{N}'
                            new_end = pos + 1
                    if new_end < 0:
                        # ' ?[^\s\p{L}\p{N}]+[\r\n]*' (Qwen3.5 also excludes \p{M})
                        excl = F_WHITESPACE | F_LETTER | F_NUMBER
                        if kind == KIND_QWEN35:
                            excl |= F_MARK
                        f2 = _fl(flags, pos + 1, ini, end) if cpt == 32 else f
                        if not (f2 & excl) and f != 0:
                            p = pos + (1 if cpt == 32 else 0)
                            while True:
                                g = _fl(flags, p, ini, end)
                                if (g & excl) or g == 0:
                                    break
                                p += 1
                            c2 = _cp(cpts, p, ini, end)
                            while c2 == 13 or c2 == 10:
                                p += 1
                                c2 = _cp(cpts, p, ini, end)
                            new_end = p
                    if new_end < 0:
                        nws = 0
                        last_rn = 0
                        while _fl(flags, pos + nws, ini, end) & F_WHITESPACE:
                            c2 = cpts[pos + nws]
                            if c2 == 13 or c2 == 10:
                                last_rn = pos + nws + 1
                            nws += 1
                        if last_rn > 0:  # '\s*[\r\n]+'
                            new_end = last_rn
                        elif nws > 1 and pos + nws < end:  # '\s+(?!\S)'
                            new_end = pos + nws - 1
                        elif nws > 0:  # '\s+'
                            new_end = pos + nws
                        else:
                            new_end = pos + 1
            if new_end > prev_end:
                out[k] = new_end - prev_end
                k += 1
                prev_end = new_end
            pos = new_end
    return out[:k]
