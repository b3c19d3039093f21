"""Training data: formats and schemas, tokenized samples with loss masks, windows, packed batches."""
