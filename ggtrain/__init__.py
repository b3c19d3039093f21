"""ggtrain: LoRA fine-tuning directly on quantized GGUF models, on the CPU."""

__version__ = "0.1.0"
