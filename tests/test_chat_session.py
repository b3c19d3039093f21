"""Chat sessions (ggtrain.generate.chat) on a tiny Qwen2 (its own ChatML template, from its GGUF) and on
Gemma 3 270M (ggtrain's bundled template): each turn's prompt is what the model's Jinja template renders
(jinja2 itself, as transformers' apply_chat_template runs it), a second turn evaluates only the tokens
the KV cache lacks, a template that rewrites earlier turns is re-evaluated from the first differing
token, and the cached conversation continues exactly as a fresh evaluation of the whole prompt."""

from __future__ import annotations

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tinymodels import tiny_model

from ggtrain.generate.chat import ChatSession, TurnRefused, common_prefix, end_of_turn_ids
from ggtrain.generate.decoder import Decoder
from ggtrain.generate.sampling import GREEDY, Sampler
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.transformer import Model
from ggtrain.text.chat import ChatTemplate
from ggtrain.text.tokenizer import Tokenizer

SYSTEM = "Answer in one short sentence."
TURNS = ["What is the capital of France?", "And what is the capital of Germany?"]


class Loaded:
    def __init__(self, path, template_file=None):
        self.mf = ModelFile(path)
        self.model = Model(self.mf)
        self.tok = Tokenizer.from_model_file(self.mf)
        self.template = ChatTemplate.from_model_file(self.mf, template_file, self.tok)

    def session(self, n_ctx=512, system=SYSTEM, n_predict=12, matmul="f32", template=None) -> ChatSession:
        return ChatSession(Decoder(self.model, n_ctx, matmul=matmul), self.tok, template or self.template,
                           Sampler(GREEDY), system, n_predict)


@pytest.fixture(scope="module", params=["qwen2", "gemma3-270m"])
def loaded(request) -> Loaded:
    if request.param == "qwen2":
        return Loaded(tiny_model("qwen2", "Q8_0"))
    return Loaded(default_model_path())


def jinja_render(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """transformers' apply_chat_template: a sandboxed jinja2 environment with trim_blocks and lstrip_blocks."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    return env.from_string(template.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=template.bos_token, eos_token=template.eos_token)


def fresh_reply(loaded: Loaded, ids: list[int], n_predict: int, stop) -> list[int]:
    """The greedy reply to the whole prompt evaluated at once in a new Decoder."""
    from ggtrain.generate.stream import generate_tokens

    out: list[int] = []
    generate_tokens(Decoder(loaded.model, 512, matmul="f32"), Sampler(GREEDY), ids, n_predict, stop, out.append)
    return out


def test_two_turns_render_as_the_jinja_template_and_feed_only_the_new_tokens(loaded: Loaded):
    s = loaded.session()
    dec = s.decoder
    t1 = s.turn(TURNS[0])
    msgs1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    assert t1.prompt == jinja_render(loaded.template, msgs1)
    assert t1.reused == 0 and t1.fed == len(t1.ids) == t1.stats.prompt_tokens
    assert t1.reply_ids and t1.reply == "".join(loaded.tok.piece(i, special=False) for i in t1.reply_ids)
    # the Decoder holds the prompt and the reply (the last reply token is never fed when -n ends it)
    fed_reply = len(t1.reply_ids) - (t1.stats.stopped_by == "n_predict")
    after1 = dec.n_past
    assert after1 == len(t1.ids) + fed_reply

    t2 = s.turn(TURNS[1])
    msgs2 = msgs1 + [{"role": "assistant", "content": t1.reply}, {"role": "user", "content": TURNS[1]}]
    assert t2.prompt == jinja_render(loaded.template, msgs2)
    # the new rendering starts with everything the cache holds: only the rest is evaluated
    assert t2.ids[:after1] == s.context[:after1] == (t1.ids + t1.reply_ids)[:after1]
    assert t2.reused == after1
    assert t2.fed == t2.stats.prompt_tokens == len(t2.ids) - after1
    assert dec.n_past == len(t2.ids) + len(t2.reply_ids) - (t2.stats.stopped_by == "n_predict")
    # and the reply is the one a full evaluation of the whole conversation gives
    assert t2.reply_ids == fresh_reply(loaded, t2.ids, 12, s.stop)


def test_a_template_that_rewrites_earlier_turns_is_reevaluated_from_the_first_difference(loaded: Loaded):
    # the header counts the messages: every turn changes the conversation's first line
    src = ("{{ bos_token }}{{ messages | length }} messages\n{% for m in messages %}{{ m['role'] }}: "
           "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tmpl = ChatTemplate(src, loaded.template.bos_token, loaded.template.eos_token, "counting template",
                        loaded.template.add_bos, loaded.template.add_eos)
    s = loaded.session(template=tmpl, system=None)
    t1 = s.turn(TURNS[0])
    held = list(s.context)
    t2 = s.turn(TURNS[1])
    assert t2.prompt.startswith(f"{loaded.template.bos_token}3 messages\n")
    first_diff = next(i for i, (a, b) in enumerate(zip(held, t2.ids)) if a != b)
    assert t1.ids[:first_diff] == t2.ids[:first_diff] and first_diff < 4  # BOS at most, then the count
    assert t2.reused == first_diff and t2.fed == len(t2.ids) - first_diff
    assert t2.reply_ids == fresh_reply(loaded, t2.ids, 12, s.stop)


def test_reset_starts_over_with_the_system_message(loaded: Loaded):
    s = loaded.session()
    t1 = s.turn(TURNS[0])
    s.turn(TURNS[1])
    s.reset()
    assert s.decoder.n_past == 0 and s.context == []
    assert s.messages == [{"role": "system", "content": SYSTEM}]
    again = s.turn(TURNS[0])
    assert again.reused == 0 and again.prompt == t1.prompt and again.reply_ids == t1.reply_ids


def test_a_turn_that_does_not_fit_is_refused_and_changes_nothing(loaded: Loaded):
    s = loaded.session(n_ctx=64, n_predict=4)
    s.turn("Hi")
    held, messages, n_past = list(s.context), list(s.messages), s.decoder.n_past
    with pytest.raises(TurnRefused, match=r"does not fit: the conversation would take \d+ tokens and the "
                                          r"context holds 64 \(-c 64\); /reset to start over, or a larger -c"):
        s.turn("word " * 80)
    assert (s.context, s.messages, s.decoder.n_past) == (held, messages, n_past)
    s.turn("Hi again")  # the session goes on
    assert s.decoder.n_past > n_past


def test_replies_stop_at_the_templates_end_of_turn_token(loaded: Loaded):
    eot = end_of_turn_ids(loaded.template, loaded.tok)
    want = "<|im_end|>" if loaded.mf.metadata["general.architecture"] == "qwen2" else "<end_of_turn>"
    assert [loaded.tok.piece(i) for i in eot] == [want]
    s = loaded.session()
    assert eot <= s.stop and frozenset(loaded.tok.eog_ids) <= s.stop
    # a template with no special token after the reply adds nothing
    plain = ChatTemplate("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", "", "", "plain")
    assert end_of_turn_ids(plain, loaded.tok) == frozenset()


def test_a_stop_token_ends_the_reply_unfed_and_the_next_turn_evaluates_what_follows(loaded: Loaded):
    """Make the greedy reply's third token a stop token (as <end_of_turn> is): the reply is its first two,
    the Decoder holds prompt + those two, and the next turn evaluates from the text after the reply."""
    free = loaded.session().turn(TURNS[0])
    s = loaded.session()
    stop_at = free.reply_ids[2]
    assert stop_at not in free.reply_ids[:2]
    s.stop = s.stop | {stop_at}
    t = s.turn(TURNS[0])
    assert t.reply_ids == free.reply_ids[:2] and t.stats.stopped_by == "eog"
    assert s.decoder.n_past == len(t.ids) + 2
    nxt = s.prepare(TURNS[1])
    assert nxt.reused == common_prefix(s.context, nxt.ids)
    if t.reply == t.reply.strip() or loaded.mf.metadata["general.architecture"] == "qwen2":  # Gemma's trims
        assert nxt.reused == s.decoder.n_past == len(t.ids) + 2
