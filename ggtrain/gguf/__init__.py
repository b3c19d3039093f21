"""GGUF model files: ModelFile (mmap, metadata, quantized tensor views), architectures -> HParams, the bundled default model."""
