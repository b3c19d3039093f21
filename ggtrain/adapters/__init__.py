"""What leaves or enters: llama.cpp GGUF LoRA adapters."""
