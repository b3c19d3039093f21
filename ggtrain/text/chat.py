"""Chat templates: the Jinja template a GGUF carries (tokenizer.chat_template), or one given with
--chat-template, rendered the way transformers' apply_chat_template and llama.cpp render it.

The environment is jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the
loop controls extension ({% break %}, {% continue %}), transformers' {% generation %} block
(rendered as its body), and the helpers templates expect: raise_exception(msg), strftime_now(fmt),
a tojson filter that does not HTML-escape (json.dumps, ensure_ascii=False). The context holds
messages, add_generation_prompt, bos_token and eos_token (the texts of the model's BOS / EOS
tokens), plus anything passed as extra keyword arguments (tools, enable_thinking, ...).

A GGUF without a template whose family has one ggtrain ships (Gemma 3: the bundled base model's
GGUF has none, though its vocabulary has the turn tokens) gets that template, and says so in `note`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile

if TYPE_CHECKING:
    from ggtrain.text.tokenizer import Tokenizer

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"

# architecture -> (template file in ggtrain.samples, tokens its output uses, the family's name): used
# for a GGUF of that architecture that has no template but has those tokens.
BUNDLED_TEMPLATES = {
    "gemma3": ("gemma3_chat_template.jinja", ("<start_of_turn>", "<end_of_turn>"), "Gemma 3"),
}


def bundled_template(mf: ModelFile) -> tuple[Path, str] | None:
    """The template file ggtrain ships for this model's family and the family's name, if it has one
    and the model's vocabulary holds the special tokens it writes."""
    from ggtrain.samples import sample_path

    entry = BUNDLED_TEMPLATES.get(str(mf.metadata.get("general.architecture")))
    if entry is None:
        return None
    name, needs, family = entry
    vocab = mf.metadata.get("tokenizer.ggml.tokens") or []
    if not all(t in vocab for t in needs):
        return None
    return sample_path(name), family


class TemplateRefused(Exception):
    """raise_exception() called by a template: the template does not accept the conversation."""


class _GenerationBlock(Extension):
    """{% generation %}...{% endgeneration %} (transformers marks assistant text with it): the body."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise TemplateRefused(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _join_text_parts(parts: list) -> str:
    """Content parts -> one string: text parts joined by newlines (llama.cpp's concat_content_parts)."""
    texts = [p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(texts)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the BOS / EOS texts it is rendered with."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = "<template>",
                 add_bos: bool = False, add_eos: bool = False, note: str | None = None):
        self.source = source
        self.origin = origin
        self.note = note  # which template is used and why, when it is not the model's own or the user's
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos  # the tokenizer adds BOS / EOS itself (see render's for_tokenizer)
        self.add_eos = add_eos
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise GGTrainError(f"{origin}: chat template does not parse: {e.message} (line {e.lineno})") from None

    @classmethod
    def from_model_file(cls, mf: ModelFile, override_path: str | Path | None = None,
                        tokenizer: Tokenizer | None = None) -> ChatTemplate:
        """The model's template, or the file override_path (--chat-template) when given, or for a GGUF
        without one, the template ggtrain ships for its family (`bundled_template`).
        bos_token / eos_token come from the model's tokenizer (pass it to skip building it again)."""
        from ggtrain.text.tokenizer import Tokenizer

        note = None
        source = mf.metadata.get(CHAT_TEMPLATE_KEY)
        bundled = None
        if override_path is None and not (isinstance(source, str) and source.strip()):
            bundled = bundled_template(mf)
        if bundled is not None:
            path, family = bundled
            source = path.read_text(encoding="utf-8")
            origin = f"{path} (ggtrain's {family} chat template)"
            note = (f"chat template: ggtrain's {family} template ({path.name}), as this {family} GGUF has "
                    f"none ({CHAT_TEMPLATE_KEY}); --chat-template FILE gives another")
        elif override_path is not None:
            path = Path(override_path)
            if not path.is_file():
                raise GGTrainError(f"{path}: no such chat template file (--chat-template)")
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise GGTrainError(f"{path}: cannot read the chat template: {e}") from None
            origin = str(path)
        else:
            if not isinstance(source, str) or not source.strip():
                raise GGTrainError(f"{mf.path}: the model has no chat template ({CHAT_TEMPLATE_KEY}); "
                                   f"give one with --chat-template FILE (a Jinja template)")
            origin = f"{mf.path} ({CHAT_TEMPLATE_KEY})"
        bos = eos = ""
        add_bos = add_eos = False
        if tokenizer is not None or "tokenizer.ggml.tokens" in mf.metadata:
            tok = tokenizer or Tokenizer.from_model_file(mf)
            bos = tok.piece(tok.bos_id) if tok.bos_id is not None else ""
            eos = tok.piece(tok.eos_id) if tok.eos_id is not None else ""
            add_bos, add_eos = tok.add_bos, tok.add_eos
        return cls(source, bos, eos, origin, add_bos, add_eos, note)

    def _renders_typed_content(self) -> bool:
        """Whether the template shows OpenAI-style content parts ([{"type": "text", ...}]); if not,
        parts are joined into a string first, as llama.cpp does for such templates."""
        if not hasattr(self, "_typed"):
            probe = [{"role": "user", "content": [{"type": "text", "text": "ggtrain-probe-7f3a"}]}]
            try:
                self._typed = "ggtrain-probe-7f3a" in self.template.render(
                    messages=probe, add_generation_prompt=False, bos_token=self.bos_token, eos_token=self.eos_token)
            except Exception:  # noqa: BLE001 - any failure means: give it strings
                self._typed = False
        return self._typed

    def render(self, messages: list[dict], add_generation_prompt: bool, for_tokenizer: bool = False,
               **extra: Any) -> str:
        """The conversation as text.

        for_tokenizer: drop a leading BOS text / trailing EOS text when the tokenizer adds those
        tokens itself (what llama.cpp does before tokenizing a rendered chat), so that
        tok.encode(text, add_special=True) does not double them.
        """
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise GGTrainError(f"{self.origin}: messages must be a list of {{'role': ..., 'content': ...}}")
        if any(isinstance(m.get("content"), list) for m in messages) and not self._renders_typed_content():
            messages = [{**m, "content": _join_text_parts(m["content"])} if isinstance(m.get("content"), list)
                        else m for m in messages]
        context = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                   "bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        try:
            text = self.template.render(**context)
        except TemplateRefused as e:
            raise GGTrainError(f"{self.origin}: the chat template refuses this conversation: {e}") from None
        except jinja2.UndefinedError as e:
            raise GGTrainError(f"{self.origin}: the chat template needs a variable ggtrain does not provide "
                               f"({e}); give another with --chat-template FILE") from None
        except jinja2.TemplateError as e:
            raise GGTrainError(f"{self.origin}: chat template failed: {type(e).__name__}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise GGTrainError(f"{self.origin}: chat template failed on these messages: "
                               f"{type(e).__name__}: {e}") from None
        if for_tokenizer:
            if self.add_bos and self.bos_token and text.startswith(self.bos_token):
                text = text[len(self.bos_token):]
            if self.add_eos and self.eos_token and text.endswith(self.eos_token):
                text = text[:-len(self.eos_token)]
        return text
