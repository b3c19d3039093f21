"""The model: the LoRA math, the transformer's forward and backward over frozen quantized weights, perplexity."""
