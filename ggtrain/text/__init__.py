"""Text: the tokenizer (SPM, BPE, pre-tokenizers, unicode tables) and chat templates."""
