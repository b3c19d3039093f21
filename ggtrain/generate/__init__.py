"""Generation: sampling, the decoding loop with its KV cache, chat sessions."""
