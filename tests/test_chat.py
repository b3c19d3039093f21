"""Chat templates: every template in llama.cpp's models/templates renders a conversation or is
refused clearly; Llama 3, Qwen2.5, Gemma and Mistral templates give their documented formats."""

from __future__ import annotations

import json
from pathlib import Path

import llamacpp
import pytest

from ggtrain.errors import GGTrainError
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.text.chat import ChatTemplate
from ggtrain.text.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "Hi there"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}
CONVERSATION = [SYSTEM, USER, ASSISTANT]


def templates_dir():
    return llamacpp.models_dir() / "templates"


def template(name: str, bos: str = "<s>", eos: str = "</s>") -> ChatTemplate:
    path = templates_dir() / f"{name}.jinja"
    return ChatTemplate(path.read_text(encoding="utf-8"), bos, eos, path.name)


def test_every_llamacpp_template_renders_or_refuses_clearly():
    paths = sorted(templates_dir().glob("*.jinja"))
    assert len(paths) > 50
    rendered, refused = [], []
    for path in paths:
        t = ChatTemplate(path.read_text(encoding="utf-8"), "<s>", "</s>", path.name)
        try:
            full = t.render(CONVERSATION, add_generation_prompt=False)
            prompt = t.render(CONVERSATION[:2], add_generation_prompt=True)
        except GGTrainError as e:
            msg = str(e)
            assert msg.startswith(path.name + ": ") and "\n" not in msg.strip()
            assert "refuses this conversation" in msg or "needs a variable" in msg
            refused.append(path.name)
            continue
        assert "Hi there" in full and "Hello!" in full, path.name
        assert "Hi there" in prompt and "Hello!" not in prompt, path.name
        rendered.append(path.name)
    # Gemma 2 has no system role; firefunction needs its own `functions` variable
    assert set(refused) <= {"google-gemma-2-2b-it.jinja", "fireworks-ai-llama-3-firefunction-v2.jinja"}
    assert len(rendered) == len(paths) - len(refused)


def test_llama3_format():
    """Meta's documented Llama 3.1 prompt format (header ids, eot after every turn)."""
    t = template("meta-llama-Llama-3.1-8B-Instruct", "<|begin_of_text|>", "<|eot_id|>")
    head = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
            "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>")
    assert t.render(CONVERSATION, False) == head + "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    assert t.render(CONVERSATION[:2], True) == head + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_qwen25_format():
    """ChatML as Qwen2.5 documents it, with its default system prompt when none is given."""
    t = template("Qwen-Qwen2.5-7B-Instruct", "", "<|im_end|>")
    assert t.render(CONVERSATION, False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert t.render([USER], True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def test_gemma_format_and_system_refused():
    """Gemma's documented turns: <start_of_turn>user / model, <end_of_turn> after each."""
    t = template("google-gemma-2-2b-it", "<bos>", "<eos>")
    assert t.render([USER, ASSISTANT], False) == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n")
    assert t.render([USER], True) == "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(GGTrainError, match="refuses this conversation: System role not supported"):
        t.render(CONVERSATION, False)


def test_mistral_formats():
    """Mistral's [INST] format (Nemo: system prompt joined to the last user turn) and the V7
    [SYSTEM_PROMPT] format of Mistral Small 3.2."""
    nemo = template("mistralai-Mistral-Nemo-Instruct-2407")
    assert nemo.render([USER, ASSISTANT], False) == "<s>[INST]Hi there[/INST]Hello!</s>"
    assert nemo.render([SYSTEM, USER], True) == "<s>[INST]You are terse.\n\nHi there[/INST]"
    small = template("Mistral-Small-3.2-24B-Instruct-2506")
    assert small.render(CONVERSATION, False) == (
        "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Hi there[/INST]Hello!</s>")


def test_default_model_gets_the_bundled_gemma3_template():
    """The bundled Gemma 3 270M GGUF has no template: ggtrain's copy of Gemma 3's is used, and said so;
    a GGUF without a template and without Gemma's turn tokens still needs --chat-template."""
    from ggtrain.samples import sample_path
    from tinymodels import tiny_model

    from ggtrain.text.chat import CHAT_TEMPLATE_KEY

    mf = ModelFile(default_model_path())
    assert CHAT_TEMPLATE_KEY not in mf.metadata and mf.metadata["general.architecture"] == "gemma3"
    tok = Tokenizer.from_model_file(mf)
    t = ChatTemplate.from_model_file(mf, tokenizer=tok)
    assert t.note.startswith("chat template: ggtrain's Gemma 3 template (gemma3_chat_template.jinja), as this "
                             "Gemma 3 GGUF has none (tokenizer.chat_template)")
    bundled = sample_path("gemma3_chat_template.jinja").read_text(encoding="utf-8")
    assert bundled == (Path(__file__).with_name("gemma3_chat_template.jinja")).read_text(encoding="utf-8")
    # User/model turns as Gemma 2's template (llama.cpp's copy) writes them; Gemma 3 takes a system prompt.
    gemma2 = ChatTemplate.from_model_file(mf, templates_dir() / "google-gemma-2-2b-it.jinja", tokenizer=tok)
    for conv in ([USER], [USER, ASSISTANT], [USER, ASSISTANT, USER]):
        assert t.render(conv, True) == gemma2.render(conv, True)
    assert t.render(CONVERSATION, False) == ("<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
                                             "<start_of_turn>model\nHello!<end_of_turn>\n")
    assert gemma2.note is None
    for other in (tiny_model("gemma3"), tiny_model("llama")):  # (their vocabulary is llama's)
        with pytest.raises(GGTrainError, match="no chat template.*--chat-template"):
            ChatTemplate.from_model_file(ModelFile(other))


def test_default_model_template_override(tmp_path):
    mf = ModelFile(default_model_path())
    with pytest.raises(GGTrainError, match="no such chat template file.*--chat-template"):
        ChatTemplate.from_model_file(mf, tmp_path / "missing.jinja")
    tok = Tokenizer.from_model_file(mf)
    t = ChatTemplate.from_model_file(mf, templates_dir() / "google-gemma-2-2b-it.jinja", tokenizer=tok)
    assert (t.bos_token, t.eos_token) == ("<bos>", "<eos>")
    text = t.render([USER, ASSISTANT], False)
    assert text.startswith("<bos><start_of_turn>")
    # for_tokenizer drops the BOS text the tokenizer adds itself: one BOS after encoding
    ids = tok.encode(t.render([USER, ASSISTANT], False, for_tokenizer=True))
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids[1] == tok.token_to_id["<start_of_turn>"]


def test_template_from_gguf_metadata():
    mf = ModelFile(llamacpp.models_dir() / "ggml-vocab-qwen2.gguf", check_types=False)
    t = ChatTemplate.from_model_file(mf)
    assert t.eos_token == "<|endoftext|>"
    assert t.render(CONVERSATION, False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")


def test_content_parts():
    """OpenAI-style content parts: joined by newlines for a template that shows only strings
    (as llama.cpp does), passed as they are to one that iterates parts."""
    parts = {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}
    qwen = template("Qwen-Qwen2.5-7B-Instruct", "", "<|im_end|>")
    assert qwen.render([SYSTEM, parts], True) == qwen.render([SYSTEM, {"role": "user", "content": "Hi\nthere"}], True)
    typed = ChatTemplate("{% for m in messages %}{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endfor %}")
    assert typed.render([parts], False) == "[Hi][there]"


def test_helpers_and_sandbox(tmp_path):
    t = ChatTemplate("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|"
                     "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}"
                     "{% endfor %}|{% generation %}{{ bos_token }}{% endgeneration %}", "<s>", "</s>")
    data, year, first, gen = t.render([{"role": "user", "content": "<b>&'"}, ASSISTANT], False).split("|")
    assert json.loads(data)[0]["content"] == "<b>&'" and "<b>" in data  # not HTML-escaped
    assert year == "4" and first == "user" and gen == "<s>"
    with pytest.raises(GGTrainError, match="chat template failed"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([USER], False)
    with pytest.raises(GGTrainError, match="does not parse"):
        ChatTemplate("{% if %}", origin="bad.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(b"\xff\xfe{{")
    with pytest.raises(GGTrainError, match="bad.jinja"):
        ChatTemplate.from_model_file(ModelFile(default_model_path()), bad)
    with pytest.raises(GGTrainError, match="list of"):
        ChatTemplate("x").render("not a list", False)  # type: ignore[arg-type]
