"""A tiny byte-level tokenizer and a jinja chat template, standing in for ggtrain.text.tokenizer / ggtrain.text.chat
in the data tests that check format and mask logic (the real ones are tested on Gemma 3 as well).

Ids 0..4 are special tokens, 5..260 the bytes 0..255: a token is exactly one byte, so a token's text
span is known without a tokenizer to trust.
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2

SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
BYTE0 = len(SPECIALS)
GEMMA3_TEMPLATE = Path(__file__).with_name("gemma3_chat_template.jinja")


class ByteTokenizer:
    bos_id = 1
    eos_id = 2
    n_vocab = BYTE0 + 256

    def __init__(self, add_bos: bool = True, add_eos: bool = False):
        self.add_bos = add_bos
        self.add_eos = add_eos
        self._special_re = re.compile("|".join(re.escape(s) for s in SPECIALS))

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        ids: list[int] = []
        pos = 0
        if parse_special:
            for m in self._special_re.finditer(text):
                ids += [BYTE0 + b for b in text[pos:m.start()].encode()]
                ids.append(SPECIALS.index(m.group()))
                pos = m.end()
        ids += [BYTE0 + b for b in text[pos:].encode()]
        if add_special and self.add_bos:
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def piece(self, i: int) -> str:
        return SPECIALS[i] if i < BYTE0 else bytes([i - BYTE0]).decode("latin-1")

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < BYTE0:
                out.append(buf.decode("utf-8", "replace"))
                buf.clear()
                out.append(SPECIALS[i])
            else:
                buf.append(i - BYTE0)
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)


class JinjaTemplate:
    """render(messages, add_generation_prompt) like ggtrain.text.chat.ChatTemplate, from a template file."""

    def __init__(self, source: str, bos_token: str = "<bos>", eos_token: str = "<eos>"):
        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.t = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def gemma3(cls) -> JinjaTemplate:
        return cls(GEMMA3_TEMPLATE.read_text())

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.t.render(messages=messages, add_generation_prompt=add_generation_prompt,
                             bos_token=self.bos_token, eos_token=self.eos_token)
