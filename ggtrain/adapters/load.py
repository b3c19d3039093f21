"""An adapter as the user names it: a llama.cpp GGUF LoRA file or a PEFT adapter directory, with
an optional :SCALE (llama.cpp's --lora-scaled). Every command that takes an adapter loads it here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ggtrain.adapters.gguf_lora import parse_lora_arg, read_gguf_adapter
from ggtrain.adapters.peft import read_peft_adapter
from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import TARGETS, LoraConfig, LoraWeights, TargetSpec, target_of


def load_adapter(path: str | os.PathLike, base: ModelFile,
                 scale: float = 1.0) -> tuple[LoraWeights, float, dict[str, Any]]:
    """(LoraWeights, alpha, metadata or adapter_config) of a GGUF adapter file or a PEFT directory,
    checked against `base`; each entry's scale is the one llama.cpp or PEFT applies, times `scale`."""
    path = Path(path)
    if path.is_dir():
        return read_peft_adapter(path, base, scale)
    return read_gguf_adapter(path, base=base, scale=scale)


def load_adapter_arg(arg: str, base: ModelFile) -> LoraWeights:
    """--lora ADAPTER[:SCALE] -> the adapter's LoraWeights at that scale."""
    path, scale = parse_lora_arg(arg)
    return load_adapter(path, base, scale)[0]


def starting_adapter(path: Path, base: ModelFile, dropout: float) -> tuple[LoraWeights, LoraConfig]:
    """finetune --lora-in: the adapter's targets, ranks, alphas and values as the trainable LoRA
    (with --lora-dropout), and the LoraConfig describing it (a target's largest rank, for the memory
    estimate)."""
    lora = load_adapter(path, base)[0]
    if "output.weight" in lora:
        raise GGTrainError(f"{path}: has a LoRA on the output head (output.weight / lm_head); training it is not "
                           "supported yet")
    layout = {name: (o, i, r, alpha, dropout) for name, (o, i, r, alpha, _) in lora.layout.items()}
    trainable = LoraWeights(layout, lora.flat.copy())
    specs: dict[str, TargetSpec] = {}
    for name, e in trainable.entries.items():
        target = target_of(name)[1]
        if target not in specs or e.rank > specs[target].rank:
            specs[target] = TargetSpec(e.rank, e.alpha, dropout)
    return trainable, LoraConfig({t: specs[t] for t in TARGETS if t in specs})
