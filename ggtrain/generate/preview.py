"""Greedy continuations of sample prompts with the LoRA being trained (finetune --sample-prompt), so the
user sees the adapter learn: the trainer calls `sample_fn(...)`'s function at every evaluation.

The prompt is tokenized as `ggtrain generate -p` tokenizes one (BOS per the model, special tokens
parsed) and continued greedily for n_tokens (or to an end-of-generation token) by a Decoder over the
model with its trainable LoRA applied as a fixed term, as it stands at that step. The Decoder leaves
the model's own weights and matmul mode alone, so training continues unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ggtrain.generate.sampling import GREEDY, Sampler
from ggtrain.model.transformer import Model
from ggtrain.text.tokenizer import Tokenizer

DEFAULT_SAMPLE_TOKENS = 32


def continuation(model: Model, tok: Tokenizer, prompt: str, n_tokens: int, matmul: str = "auto") -> dict[str, Any]:
    """{"prompt", "text", "tokens"}: the greedy continuation of `prompt` by `model` as it is now."""
    from ggtrain.generate.chat import pieces_text
    from ggtrain.generate.decoder import Decoder
    from ggtrain.generate.stream import generate_tokens

    ids = tok.encode(prompt, add_special=True, parse_special=True)
    decoder = Decoder(model, len(ids) + n_tokens, matmul=matmul)
    reply: list[int] = []
    stats = generate_tokens(decoder, Sampler(GREEDY), ids, n_tokens, tok.eog_ids, reply.append)
    if stats.stopped_by == "interrupt":  # the trainer's third Ctrl-C (quit now): not a sample's to swallow
        raise KeyboardInterrupt
    return {"prompt": prompt, "text": pieces_text(tok, reply), "tokens": len(reply)}


def sample_fn(tok: Tokenizer, prompts: Sequence[str], n_tokens: int = DEFAULT_SAMPLE_TOKENS,
              matmul: str = "auto") -> Callable[[Model], list[dict[str, Any]]]:
    """The Trainer's `samples` hook: the model being trained -> one continuation record per prompt."""
    return lambda model: [continuation(model, tok, p, n_tokens, matmul) for p in prompts]
