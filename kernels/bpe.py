"""Tokenizer hot loops (Numba): a byte-string hash table over the vocabulary, the SentencePiece
bigram merge and the byte-level BPE merge, both as llama.cpp's llama-vocab.cpp runs them.

Strings live in one uint8 blob with int64 offsets (string i is blob[offs[i]:offs[i+1]]); the
table is open addressing over FNV-1a hashes holding int32 ids (-1 = empty). Both tokenizers keep
symbols as a linked list over the input bytes and a binary heap of candidate merges ordered by
(key, left index): key = -score for SentencePiece (best score first), the merge rank for BPE
(lowest rank first); ties go to the leftmost pair, as std::priority_queue does in llama.cpp.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)


@njit(cache=True, inline="always")
def _mix(h):
    # splitmix64's finaliser: every input bit reaches the low bits the table masks with
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


@njit(cache=True, inline="always")
def _hash(buf, s, e):
    h = _FNV_OFFSET
    for i in range(s, e):
        h = (h ^ np.uint64(buf[i])) * _FNV_PRIME
    return _mix(h)


@njit(cache=True, inline="always")
def _equal(blob, bs, be, buf, s, e):
    if be - bs != e - s:
        return False
    for i in range(e - s):
        if blob[bs + i] != buf[s + i]:
            return False
    return True


@njit(cache=True)
def table_find(table, blob, offs, buf, s, e):
    """Id of the string buf[s:e], or -1."""
    mask = np.uint64(table.shape[0] - 1)
    slot = _hash(buf, s, e) & mask
    while True:
        i = table[slot]
        if i < 0:
            return -1
        if _equal(blob, offs[i], offs[i + 1], buf, s, e):
            return i
        slot = (slot + np.uint64(1)) & mask


@njit(cache=True)
def _table_put(table, blob, offs, i):
    """Insert string i; an equal string already there is replaced (the later id wins, as in
    llama.cpp's token_to_id[word] = i)."""
    mask = np.uint64(table.shape[0] - 1)
    slot = _hash(blob, offs[i], offs[i + 1]) & mask
    while True:
        j = table[slot]
        if j < 0 or _equal(blob, offs[j], offs[j + 1], blob, offs[i], offs[i + 1]):
            table[slot] = i
            return
        slot = (slot + np.uint64(1)) & mask


def table_capacity(n: int) -> int:
    """Power of two with load factor <= 0.5."""
    cap = 16
    while cap < 2 * n:
        cap *= 2
    return cap


@njit(cache=True)
def table_build(blob, offs, valid, cap):
    """Table over strings i with valid[i] (an invalid string is never found). -> int32 (cap,)"""
    table = np.full(cap, -1, dtype=np.int32)
    for i in range(offs.shape[0] - 1):
        if valid[i]:
            _table_put(table, blob, offs, i)
    return table


# ---------------------------------------------------------------------------------------------
# heap of candidate merges: arrays (key f64, left i32, right i32, size i64), best at index 0


@njit(cache=True, inline="always")
def _before(hk, hl, a, b):
    return hk[a] < hk[b] or (hk[a] == hk[b] and hl[a] < hl[b])


@njit(cache=True, inline="always")
def _swap(hk, hl, hr, hs, a, b):
    hk[a], hk[b] = hk[b], hk[a]
    hl[a], hl[b] = hl[b], hl[a]
    hr[a], hr[b] = hr[b], hr[a]
    hs[a], hs[b] = hs[b], hs[a]


@njit(cache=True)
def _heap_push(hk, hl, hr, hs, n, key, left, right, size):
    hk[n], hl[n], hr[n], hs[n] = key, left, right, size
    i = n
    while i > 0:
        p = (i - 1) >> 1
        if _before(hk, hl, i, p):
            _swap(hk, hl, hr, hs, i, p)
            i = p
        else:
            break
    return n + 1


@njit(cache=True)
def _heap_pop(hk, hl, hr, hs, n):
    """Move the best entry to index n-1; returns the new size n-1."""
    n -= 1
    _swap(hk, hl, hr, hs, 0, n)
    i = 0
    while True:
        a = 2 * i + 1
        if a >= n:
            break
        b = a + 1
        c = b if (b < n and _before(hk, hl, b, a)) else a
        if _before(hk, hl, c, i):
            _swap(hk, hl, hr, hs, c, i)
            i = c
        else:
            break
    return n


# ---------------------------------------------------------------------------------------------
# SentencePiece (llama.cpp llm_tokenizer_spm_session)


@njit(cache=True, inline="always")
def _utf8_len(b):
    hb = b >> 4
    if hb < 12:
        return 1
    if hb < 14:
        return 2
    if hb == 14:
        return 3
    return 4


@njit(cache=True)
def _spm_try_bigram(text, start, n, left, right, table, blob, offs, scores, n_vocab,
                    hk, hl, hr, hs, hn):
    if left < 0 or right < 0:
        return hn
    s = start[left]
    e = s + n[left] + n[right]
    tok = table_find(table, blob, offs, text, s, e)
    if tok < 0 or tok >= n_vocab:
        return hn
    return _heap_push(hk, hl, hr, hs, hn, -np.float64(scores[tok]), left, right, e - s)


@njit(cache=True)
def spm_space_left(blob, offs):
    """Code points c such that some token contains c followed by U+2581. -> bool (0x110000,)
    Anywhere else, a U+2581 in the text starts a piece no merge can reach across."""
    out = np.zeros(0x110000, dtype=np.bool_)
    for i in range(offs.shape[0] - 1):
        s = offs[i]
        for j in range(s + 1, offs[i + 1] - 2):
            if blob[j] == 0xE2 and blob[j + 1] == 0x96 and blob[j + 2] == 0x81:
                p = j - 1
                while p > s and (blob[p] & 0xC0) == 0x80:
                    p -= 1
                out[_cp_at(blob, p)] = True
    return out


@njit(cache=True, inline="always")
def _cp_at(buf, i):
    b = np.int64(buf[i])
    if b < 0x80:
        return b
    if b < 0xE0:
        return ((b & 0x1F) << 6) | (np.int64(buf[i + 1]) & 0x3F)
    if b < 0xF0:
        return ((b & 0x0F) << 12) | ((np.int64(buf[i + 1]) & 0x3F) << 6) | (np.int64(buf[i + 2]) & 0x3F)
    return (((b & 0x07) << 18) | ((np.int64(buf[i + 1]) & 0x3F) << 12)
            | ((np.int64(buf[i + 2]) & 0x3F) << 6) | (np.int64(buf[i + 3]) & 0x3F)) & 0x1FFFFF


@njit(cache=True)
def _spm_piece(text, ps, pe, table, blob, offs, scores, byte_tok, n_vocab,
               start, n, prev, nxt, hk, hl, hr, hs, out, pos, k):
    """The SentencePiece merge over text[ps:pe]; appends its ids to out[k:] (and where each
    starts in text to pos[k:]), returns the new k."""
    m = 0
    o = ps
    while o < pe:
        c = min(_utf8_len(text[o]), pe - o)
        start[m] = o
        n[m] = c
        prev[m] = m - 1
        o += c
        nxt[m] = -1 if o == pe else m + 1
        m += 1
    hn = 0
    for i in range(1, m):
        hn = _spm_try_bigram(text, start, n, i - 1, i, table, blob, offs, scores, n_vocab,
                             hk, hl, hr, hs, hn)
    while hn > 0:
        hn = _heap_pop(hk, hl, hr, hs, hn)
        left = hl[hn]
        right = hr[hn]
        if n[left] == 0 or n[right] == 0 or n[left] + n[right] != hs[hn]:
            continue  # stale: one side already merged elsewhere
        n[left] += n[right]
        n[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        hn = _spm_try_bigram(text, start, n, prev[left], left, table, blob, offs, scores, n_vocab,
                             hk, hl, hr, hs, hn)
        hn = _spm_try_bigram(text, start, n, left, nxt[left], table, blob, offs, scores, n_vocab,
                             hk, hl, hr, hs, hn)
    i = 0 if m > 0 else -1
    while i != -1:
        s = start[i]
        e = s + n[i]
        tok = table_find(table, blob, offs, text, s, e)
        if tok >= 0:
            out[k] = tok
            pos[k] = s
            k += 1
        else:
            for j in range(s, e):
                b = byte_tok[text[j]]
                if b >= 0:
                    out[k] = b
                    pos[k] = j
                    k += 1
        i = nxt[i]
    return k


# per-call cache of pieces already tokenized: open addressing over the piece's bytes in text


@njit(cache=True)
def _cache_find(ctab, cs, ce, text, s, e):
    """-> (entry index or -1, slot where it is or would go)"""
    mask = np.uint64(ctab.shape[0] - 1)
    slot = _hash(text, s, e) & mask
    while True:
        j = ctab[slot]
        if j < 0 or _equal(text, cs[j], ce[j], text, s, e):
            return j, slot
        slot = (slot + np.uint64(1)) & mask


@njit(cache=True)
def _cache_copy(out, pos, k, cos, coc, j, shift):
    """Append cached entry j's ids (positions moved by shift) at out[k:]; returns the new k."""
    for q in range(coc[j]):
        out[k + q] = out[cos[j] + q]
        pos[k + q] = pos[cos[j] + q] + shift
    return k + coc[j]


@njit(cache=True)
def _cache_put(ctab, cs, ce, cos, coc, nent, slot, s, e, k0, k):
    """Record text[s:e] -> out[k0:k] as entry nent at slot; returns nent + 1."""
    ctab[slot] = nent
    cs[nent], ce[nent], cos[nent], coc[nent] = s, e, k0, k - k0
    return nent + 1


# ---------------------------------------------------------------------------------------------
# byte-level BPE (llama.cpp llm_tokenizer_bpe_session), run on raw bytes: GPT-2's byte-to-unicode
# map is a bijection, so a raw-byte string and its encoded form name the same token.


@njit(cache=True)
def _decode_mapped(src, s, e, inv, dst, d):
    """Decode UTF-8 src[s:e] and map each code point through inv (code point -> byte, -1 = none)
    into dst[d:]. Returns the new end, or -1 if a code point has no byte."""
    i = s
    while i < e:
        b = np.int64(src[i])
        if b < 0x80:
            cp = b
            i += 1
        elif b < 0xE0:
            cp = ((b & 0x1F) << 6) | (np.int64(src[i + 1]) & 0x3F)
            i += 2
        elif b < 0xF0:
            cp = ((b & 0x0F) << 12) | ((np.int64(src[i + 1]) & 0x3F) << 6) | (np.int64(src[i + 2]) & 0x3F)
            i += 3
        else:
            cp = ((b & 0x07) << 18) | ((np.int64(src[i + 1]) & 0x3F) << 12) \
                | ((np.int64(src[i + 2]) & 0x3F) << 6) | (np.int64(src[i + 3]) & 0x3F)
            i += 4
        if cp >= inv.shape[0] or inv[cp] < 0:
            return -1
        dst[d] = inv[cp]
        d += 1
    return d


@njit(cache=True)
def bpe_vocab_raw(tok_blob, tok_offs, inv):
    """Token strings (byte-encoded UTF-8) -> raw bytes. -> (blob u8, offs i64, valid bool)
    A token with a character outside the byte map can never be produced by a merge: invalid."""
    n = tok_offs.shape[0] - 1
    blob = np.empty(tok_blob.shape[0], dtype=np.uint8)
    offs = np.zeros(n + 1, dtype=np.int64)
    valid = np.zeros(n, dtype=np.bool_)
    d = 0
    for i in range(n):
        e = _decode_mapped(tok_blob, tok_offs[i], tok_offs[i + 1], inv, blob, d)
        if e > d:
            valid[i] = True
            d = e
        offs[i + 1] = d
    return blob[:d], offs, valid


@njit(cache=True)
def _find_or_add(table, blob, offs, count, s, e, scratch):
    """Id of scratch[s:e] among strings 0..count-1, appending it to blob/offs if absent."""
    i = table_find(table, blob, offs, scratch, s, e)
    if i >= 0:
        return i, count
    o = offs[count]
    for j in range(e - s):
        blob[o + j] = scratch[s + j]
    offs[count + 1] = o + (e - s)
    _table_put(table, blob, offs, count)
    return count, count + 1


@njit(cache=True)
def bpe_build(raw_blob, raw_offs, raw_valid, merge_blob, merge_offs, inv):
    """The merge table of a byte-level BPE vocabulary, in raw bytes.

    Strings 0..n_vocab-1 are the tokens; a merge half or result that is no token gets an id
    >= n_vocab. Merge i is "first second" split at the first space after position 0; the first
    entry for a pair wins (std::map::emplace), later duplicates are ignored.
    -> (str_table i32, str_blob u8, str_offs i64, str_valid bool, pair_keys i64, pair_rank i32,
        pair_result i32)  # pair table: key = left << 32 | right, open addressing, -1 = empty
    """
    n_vocab = raw_offs.shape[0] - 1
    n_merges = merge_offs.shape[0] - 1
    max_str = n_vocab + 3 * n_merges
    blob = np.empty(raw_blob.shape[0] + 2 * merge_blob.shape[0] + 16, dtype=np.uint8)
    blob[:raw_blob.shape[0]] = raw_blob
    offs = np.zeros(max_str + 1, dtype=np.int64)
    offs[:n_vocab + 1] = raw_offs
    cap = 16
    while cap < 2 * max_str:
        cap *= 2
    table = np.full(cap, -1, dtype=np.int32)
    for i in range(n_vocab):
        if raw_valid[i]:
            _table_put(table, blob, offs, i)
    count = n_vocab
    pcap = 16
    while pcap < 2 * n_merges:
        pcap *= 2
    pkeys = np.full(pcap, -1, dtype=np.int64)
    prank = np.zeros(pcap, dtype=np.int32)
    pres = np.zeros(pcap, dtype=np.int32)
    pmask = np.uint64(pcap - 1)
    scratch = np.empty(2 * (merge_blob.shape[0] + 1), dtype=np.uint8)
    for r in range(n_merges):
        s = merge_offs[r]
        e = merge_offs[r + 1]
        sp = -1
        for j in range(s + 1, e):
            if merge_blob[j] == 32:
                sp = j
                break
        if sp < 0:
            continue
        a_end = _decode_mapped(merge_blob, s, sp, inv, scratch, 0)
        if a_end <= 0:
            continue
        b_end = _decode_mapped(merge_blob, sp + 1, e, inv, scratch, a_end)
        if b_end <= a_end:
            continue
        left, count = _find_or_add(table, blob, offs, count, 0, a_end, scratch)
        right, count = _find_or_add(table, blob, offs, count, a_end, b_end, scratch)
        key = (np.int64(left) << 32) | np.int64(right)
        slot = _mix(np.uint64(key)) & pmask
        while pkeys[slot] >= 0 and pkeys[slot] != key:
            slot = (slot + np.uint64(1)) & pmask
        if pkeys[slot] == key:
            continue
        res, count = _find_or_add(table, blob, offs, count, 0, b_end, scratch)
        pkeys[slot] = key
        prank[slot] = r
        pres[slot] = res
    valid = np.zeros(count, dtype=np.bool_)
    valid[:n_vocab] = raw_valid
    valid[n_vocab:] = True
    return table, blob[:offs[count]].copy(), offs[:count + 1].copy(), valid, pkeys, prank, pres


@njit(cache=True, inline="always")
def _pair_find(pkeys, left, right):
    key = (np.int64(left) << 32) | np.int64(right)
    pmask = np.uint64(pkeys.shape[0] - 1)
    slot = _mix(np.uint64(key)) & pmask
    while True:
        k = pkeys[slot]
        if k == key:
            return np.int64(slot)
        if k < 0:
            return np.int64(-1)
        slot = (slot + np.uint64(1)) & pmask


@njit(cache=True)
def _bpe_try(sid, n, left, right, pkeys, prank, hk, hl, hr, hs, hn):
    if left < 0 or right < 0 or sid[left] < 0 or sid[right] < 0:
        return hn
    slot = _pair_find(pkeys, sid[left], sid[right])
    if slot < 0:
        return hn
    return _heap_push(hk, hl, hr, hs, hn, np.float64(prank[slot]), left, right, n[left] + n[right])


@njit(cache=True)
def _bpe_word(text, ws, we, table, blob, offs, n_vocab, pkeys, prank, pres, byte_id, ignore_merges,
              start, n, sid, prev, nxt, hk, hl, hr, hs, out, pos, k):
    """BPE of one word text[ws:we]; appends its ids to out[k:] (and where each starts in text to
    pos[k:]), returns the new k."""
    if ignore_merges:
        t = table_find(table, blob, offs, text, ws, we)
        if 0 <= t < n_vocab:
            out[k] = t
            pos[k] = ws
            return k + 1
    m = we - ws
    for i in range(m):
        start[i] = ws + i
        n[i] = 1
        sid[i] = byte_id[text[ws + i]]
        prev[i] = i - 1
        nxt[i] = i + 1 if i + 1 < m else -1
    hn = 0
    for i in range(1, m):
        hn = _bpe_try(sid, n, i - 1, i, pkeys, prank, hk, hl, hr, hs, hn)
    while hn > 0:
        hn = _heap_pop(hk, hl, hr, hs, hn)
        left = hl[hn]
        right = hr[hn]
        if n[left] == 0 or n[right] == 0 or n[left] + n[right] != hs[hn]:
            continue
        slot = _pair_find(pkeys, sid[left], sid[right])
        n[left] += n[right]
        n[right] = 0
        sid[left] = pres[slot]
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        hn = _bpe_try(sid, n, prev[left], left, pkeys, prank, hk, hl, hr, hs, hn)
        hn = _bpe_try(sid, n, left, nxt[left], pkeys, prank, hk, hl, hr, hs, hn)
    i = 0
    while i != -1:
        t = sid[i]
        if 0 <= t < n_vocab:
            out[k] = t
            pos[k] = start[i]
            k += 1
        else:
            for j in range(start[i], start[i] + n[i]):
                b = text[j]
                if 0x21 <= b <= 0x7E:
                    t = table_find(table, blob, offs, text, j, j + 1)
                    if 0 <= t < n_vocab:
                        out[k] = t
                        pos[k] = j
                        k += 1
        i = nxt[i]
    return k


@njit(cache=True)
def bpe_encode(text, word_start, word_ends, word_tok, table, blob, offs, n_vocab, pkeys, prank, pres,
               byte_id, ignore_merges):
    """Token ids of raw-byte text split into words: the first starts at word_start, word i ends
    at word_ends[i]. A word with word_tok[i] >= 0 is that (special) token as it stands.
    -> (ids int32 (k,), byte where each token starts int64 (k,))

    Each word starts as one symbol per byte; the lowest-rank adjacent pair merges first
    (leftmost on ties). With ignore_merges a word that is itself a token is taken whole.
    A final symbol that is no token falls back to the tokens of its single bytes, where the
    byte's encoded form is one ASCII character (llama.cpp looks up each encoded byte).
    """
    L = (word_ends[-1] - word_start) if word_ends.shape[0] else 0
    out = np.empty(L + word_ends.shape[0], dtype=np.int32)
    pos = np.empty(L + word_ends.shape[0], dtype=np.int64)
    k = 0
    longest = 0
    ws = word_start
    for w in range(word_ends.shape[0]):
        longest = max(longest, word_ends[w] - ws)
        ws = word_ends[w]
    cap = 3 * longest + 4
    start = np.empty(longest, dtype=np.int64)
    n = np.empty(longest, dtype=np.int64)
    sid = np.empty(longest, dtype=np.int64)
    prev = np.empty(longest, dtype=np.int64)
    nxt = np.empty(longest, dtype=np.int64)
    hk = np.empty(cap, dtype=np.float64)
    hl = np.empty(cap, dtype=np.int64)
    hr = np.empty(cap, dtype=np.int64)
    hs = np.empty(cap, dtype=np.int64)
    nw = word_ends.shape[0]
    ccap = 16
    while ccap < 2 * nw:
        ccap *= 2
    ctab = np.full(ccap, -1, dtype=np.int64)  # per-call cache: a repeated word is copied
    cs = np.empty(nw, dtype=np.int64)
    ce = np.empty(nw, dtype=np.int64)
    cos = np.empty(nw, dtype=np.int64)
    coc = np.empty(nw, dtype=np.int64)
    nent = 0
    ws = word_start
    for w in range(nw):
        we = word_ends[w]
        if word_tok[w] >= 0:
            out[k] = word_tok[w]
            pos[k] = ws
            k += 1
            ws = we
            continue
        if we <= ws:
            continue
        j, slot = _cache_find(ctab, cs, ce, text, ws, we)
        if j >= 0:
            k = _cache_copy(out, pos, k, cos, coc, j, ws - cs[j])
        else:
            k0 = k
            k = _bpe_word(text, ws, we, table, blob, offs, n_vocab, pkeys, prank, pres, byte_id,
                          ignore_merges, start, n, sid, prev, nxt, hk, hl, hr, hs, out, pos, k)
            nent = _cache_put(ctab, cs, ce, cos, coc, nent, slot, ws, we, k0, k)
        ws = we
    return out[:k], pos[:k]


# ---------------------------------------------------------------------------------------------
# special tokens in text (llama.cpp tokenizer_st_partition), on code points


@njit(cache=True, inline="always")
def _c_space(c):
    return c == 32 or 9 <= c <= 13  # isspace() in the C locale


@njit(cache=True)
def st_partition(cpts, tok_cpts, tok_offs, tok_ids, tok_strip, first_pos, first_offs, tok_first):
    """Cut special tokens out of cpts, one token after the other in the given (priority) order,
    each at its leftmost non-overlapping occurrences inside the still-raw fragments.
    tok_strip bit 1: LSTRIP (drop whitespace before), bit 2: RSTRIP (after).
    first_pos[first_offs[g]:first_offs[g+1]]: ascending positions of character group g in cpts;
    token j starts with group tok_first[j] (so only those positions are tried).
    -> (start i64, end i64, token i32): fragment f is the token if token[f] >= 0, else the
    raw code points cpts[start[f]:end[f]]."""
    n = cpts.shape[0]
    cap = 2 * n + 2
    fs = np.empty(cap, dtype=np.int64)
    fe = np.empty(cap, dtype=np.int64)
    ft = np.empty(cap, dtype=np.int32)
    gs = np.empty(cap, dtype=np.int64)
    ge = np.empty(cap, dtype=np.int64)
    gt = np.empty(cap, dtype=np.int32)
    nf = 0
    if n > 0:
        fs[0], fe[0], ft[0] = 0, n, -1
        nf = 1
    for j in range(tok_ids.shape[0]):
        ts = tok_offs[j]
        lt = tok_offs[j + 1] - ts
        cand = first_pos[first_offs[tok_first[j]]:first_offs[tok_first[j] + 1]]
        lstrip = (tok_strip[j] & 1) != 0
        rstrip = (tok_strip[j] & 2) != 0
        ng = 0
        for f in range(nf):
            if ft[f] >= 0:
                gs[ng], ge[ng], gt[ng] = fs[f], fe[f], ft[f]
                ng += 1
                continue
            pos = fs[f]
            end = fe[f]
            c = np.searchsorted(cand, pos)
            while c < cand.shape[0]:
                i = cand[c]
                if i + lt > end:
                    break
                if i < pos:
                    c += 1
                    continue
                q = 1
                while q < lt and cpts[i + q] == tok_cpts[ts + q]:
                    q += 1
                if q < lt:
                    c += 1
                    continue
                left = i
                if lstrip:
                    while left > pos and _c_space(cpts[left - 1]):
                        left -= 1
                if left > pos:
                    gs[ng], ge[ng], gt[ng] = pos, left, -1
                    ng += 1
                gs[ng], ge[ng], gt[ng] = i, i + lt, tok_ids[j]
                ng += 1
                pos = i + lt
                if rstrip:
                    while pos < end and _c_space(cpts[pos]):
                        pos += 1
                c += 1
            if pos < end:
                gs[ng], ge[ng], gt[ng] = pos, end, -1
                ng += 1
        fs, gs = gs, fs
        fe, ge = ge, fe
        ft, gt = gt, ft
        nf = ng
    return fs[:nf].copy(), fe[:nf].copy(), ft[:nf].copy()


@njit(cache=True)
def spm_encode_fragments(esc, frag_s, frag_e, frag_tok, frag_prefix, table, blob, offs, scores,
                         byte_tok, n_vocab, space_left):
    """SentencePiece ids of a partitioned text. esc: the UTF-8 text with spaces escaped to
    U+2581; fragment f is token frag_tok[f] (>= 0) or esc[frag_s[f]:frag_e[f]], with a U+2581
    prepended when frag_prefix[f]. -> (ids int32 (k,), byte of esc where each token starts
    int64 (k,); a prefix U+2581 counts as its fragment's start)"""
    nf = frag_s.shape[0]
    size = 0
    for f in range(nf):
        if frag_tok[f] < 0:
            size += frag_e[f] - frag_s[f] + (3 if frag_prefix[f] else 0)
    work = np.empty(size, dtype=np.uint8)
    src = np.empty(size, dtype=np.int64)  # work byte -> esc byte
    bounds = np.empty(nf + 1, dtype=np.int64)
    w = 0
    for f in range(nf):
        bounds[f] = w
        if frag_tok[f] < 0:
            if frag_prefix[f]:
                work[w], work[w + 1], work[w + 2] = 0xE2, 0x96, 0x81
                src[w], src[w + 1], src[w + 2] = frag_s[f], frag_s[f], frag_s[f]
                w += 3
            for i in range(frag_s[f], frag_e[f]):
                work[w] = esc[i]
                src[w] = i
                w += 1
    bounds[nf] = w
    ids, wpos, frag = spm_encode_ranges(work, bounds, frag_tok, table, blob, offs, scores, byte_tok,
                                        n_vocab, space_left)
    pos = np.empty(ids.shape[0], dtype=np.int64)
    for q in range(ids.shape[0]):
        pos[q] = frag_s[frag[q]] if frag_tok[frag[q]] >= 0 else src[wpos[q]]
    return ids, pos


@njit(cache=True)
def spm_encode_ranges(text, bounds, frag_tok, table, blob, offs, scores, byte_tok, n_vocab, space_left):
    """Token ids of the ranges text[bounds[f]:bounds[f+1]] (spaces already escaped to U+2581), or
    token frag_tok[f] where that is >= 0, sharing one cache of pieces. -> (ids int32 (k,), byte of
    text where each starts int64 (k,), fragment of each int64 (k,))

    Symbols start as UTF-8 characters; the highest-scoring adjacent pair that is a vocabulary
    token merges first (leftmost on ties) until no pair is a token. A final symbol that is not a
    token becomes byte tokens (<0xXX>); byte_tok[b] = -1 drops a byte the vocabulary lacks.
    The text is cut before every U+2581 that no token can span (space_left, see spm_space_left):
    merges never cross such a cut, so each piece merges alone (same result as one long queue)
    and a repeated piece is looked up instead of merged again."""
    L = text.shape[0]
    nf = frag_tok.shape[0]
    # pieces: cut before each U+2581 no token can span, and at fragment ends
    cuts = np.empty(L + nf + 1, dtype=np.int64)
    ptok = np.empty(L + nf + 1, dtype=np.int32)  # token standing alone, or -1
    pfrag = np.empty(L + nf + 1, dtype=np.int64)  # fragment of each piece
    nc = 0
    for f in range(nf):
        if frag_tok[f] >= 0:
            cuts[nc] = bounds[f]
            ptok[nc] = frag_tok[f]
            pfrag[nc] = f
            nc += 1
            continue
        o = bounds[f]
        fe = bounds[f + 1]
        prev_cp = -1
        while o < fe:
            c = _utf8_len(text[o])
            if (o > bounds[f] and c == 3 and o + 2 < fe and text[o] == 0xE2 and text[o + 1] == 0x96
                    and text[o + 2] == 0x81 and not space_left[prev_cp]):
                cuts[nc] = o
                ptok[nc] = -1
                pfrag[nc] = f
                nc += 1
            prev_cp = _cp_at(text, o) if o + c <= fe else 0
            o += c
        cuts[nc] = fe
        ptok[nc] = -1
        pfrag[nc] = f
        nc += 1
    longest = 0
    ps = 0
    for i in range(nc):
        if ptok[i] < 0:
            longest = max(longest, cuts[i] - ps)
            ps = cuts[i]
    start = np.empty(longest, dtype=np.int64)
    n = np.empty(longest, dtype=np.int64)
    prev = np.empty(longest, dtype=np.int64)
    nxt = np.empty(longest, dtype=np.int64)
    cap = 3 * longest + 4
    hk = np.empty(cap, dtype=np.float64)
    hl = np.empty(cap, dtype=np.int64)
    hr = np.empty(cap, dtype=np.int64)
    hs = np.empty(cap, dtype=np.int64)
    ccap = 16
    while ccap < 2 * nc:
        ccap *= 2
    ctab = np.full(ccap, -1, dtype=np.int64)
    cs = np.empty(nc, dtype=np.int64)
    ce = np.empty(nc, dtype=np.int64)
    cos = np.empty(nc, dtype=np.int64)
    coc = np.empty(nc, dtype=np.int64)
    nent = 0
    out = np.empty(L + nf, dtype=np.int32)
    pos = np.empty(L + nf, dtype=np.int64)
    frag = np.empty(L + nf, dtype=np.int64)
    k = 0
    ps = 0
    for i in range(nc):
        if ptok[i] >= 0:
            out[k] = ptok[i]
            pos[k] = cuts[i]
            frag[k] = pfrag[i]
            k += 1
            continue
        pe = cuts[i]
        if pe > ps:
            k0 = k
            j, slot = _cache_find(ctab, cs, ce, text, ps, pe)
            if j >= 0:
                k = _cache_copy(out, pos, k, cos, coc, j, ps - cs[j])
            else:
                k = _spm_piece(text, ps, pe, table, blob, offs, scores, byte_tok, n_vocab,
                               start, n, prev, nxt, hk, hl, hr, hs, out, pos, k)
                nent = _cache_put(ctab, cs, ce, cos, coc, nent, slot, ps, pe, k0, k)
            frag[k0:k] = pfrag[i]
        ps = pe
    return out[:k], pos[:k], frag[:k]


# ---------------------------------------------------------------------------------------------
# detokenization: every token's bytes (llama.cpp token_to_piece with special=true) in one blob

PIECE_EMPTY, PIECE_RAW, PIECE_SPM, PIECE_BPE, PIECE_BYTE = 0, 1, 2, 3, 4


@njit(cache=True)
def _hex_digit(c):
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return 0


@njit(cache=True)
def piece_blob(blob, offs, how, inv):
    """Bytes of every token: how[i] is PIECE_EMPTY (unused/undefined), PIECE_RAW (control,
    user-defined: the text as is), PIECE_SPM (U+2581 -> space), PIECE_BPE (each character through
    the byte map inv), PIECE_BYTE (<0xXX> -> that byte).
    -> (pieces u8, offsets i64 (n+1,), failed bool (n,): a BPE token with a character outside
    the map, left empty for the caller)"""
    n = offs.shape[0] - 1
    out = np.empty(blob.shape[0], dtype=np.uint8)
    poffs = np.zeros(n + 1, dtype=np.int64)
    failed = np.zeros(n, dtype=np.bool_)
    d = 0
    for i in range(n):
        s = offs[i]
        e = offs[i + 1]
        h = how[i]
        if h == PIECE_RAW:
            for j in range(s, e):
                out[d] = blob[j]
                d += 1
        elif h == PIECE_SPM:
            j = s
            while j < e:
                if j + 2 < e and blob[j] == 0xE2 and blob[j + 1] == 0x96 and blob[j + 2] == 0x81:
                    out[d] = 32
                    j += 3
                else:
                    out[d] = blob[j]
                    j += 1
                d += 1
        elif h == PIECE_BPE:
            r = _decode_mapped(blob, s, e, inv, out, d)
            if r < 0:
                failed[i] = True
            else:
                d = r
        elif h == PIECE_BYTE and e - s >= 5:
            out[d] = _hex_digit(blob[s + 3]) * 16 + _hex_digit(blob[s + 4])
            d += 1
        poffs[i + 1] = d
    return out[:d], poffs, failed
