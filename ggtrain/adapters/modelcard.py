"""The README.md model card of an exported PEFT adapter: base model, data, settings, training
figures, and how to load it with PEFT, TGI, vLLM and llama.cpp.

What ggtrain knows of the training comes from the adapter's own metadata (training.* keys) and,
when the adapter still lies in its `ggtrain finetune --outdir`, from that run's train_log.jsonl and
the checkpoint of the adapter's step (a RunRecord, read by ggtrain.train.outputs.run_record: the
training stage knows its own files).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunRecord:
    """What a finetune run directory tells about the adapter's training."""

    config: dict[str, Any] = field(default_factory=dict)  # TrainConfig of the run (checkpoint)
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    val_losses: dict[int, float] = field(default_factory=dict)


def _settings(cfg: Mapping[str, Any]) -> list[str]:
    names = (("epochs", "epochs"), ("max_steps", "--adam-iter"), ("batch", "batch"), ("grad_acc", "gradient accumulation"),
             ("ctx", "context (tokens per row)"), ("lr", "learning rate"), ("warmup", "warmup steps"),
             ("cos_decay_steps", "cosine decay steps"), ("cos_decay_min", "cosine decay floor"),
             ("weight_decay", "weight decay"), ("grad_clip", "gradient clip"), ("seed", "seed"))
    return [f"- {label}: {cfg[k]}" for k, label in names if k in cfg and cfg[k] is not None]


def peft_card(*, title: str, base_id: str | None, base_file: str | None, arch: str, config: Mapping[str, Any],
              n_params: int, adapter_file: str, adapter_meta: Mapping[str, Any], run: RunRecord,
              dir_name: str) -> str:
    """The card's markdown. config: the adapter_config.json written beside it; base_id: its
    base_model_name_or_path (a Hugging Face id when it has a '/'); dir_name: the directory's name."""
    base_shown = base_id or "the base model"
    hub_id = base_id if base_id and "/" in base_id else None  # the card's base_model must be a Hub id
    r, alpha = config["r"], config["lora_alpha"]
    ranks = config.get("rank_pattern") or {}
    lines = ["---", "library_name: peft"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    lines += ["tags:", "- lora", "- peft", "- ggtrain", "---", "", f"# {title}", "",
              (f"A LoRA adapter for **{base_shown}** ({arch}), trained with ggtrain on the CPU directly on a GGUF "
               f"model and exported from `{adapter_file}` to PEFT's format."), "",
              "## Adapter", "",
              f"- base model: {base_shown}" + (f" (GGUF: `{base_file}`)" if base_file else ""),
              f"- targets: {', '.join(config['target_modules'])}",
              f"- rank {r}, alpha {alpha} (scale alpha / rank)"
              + (f"; per module: rank_pattern {json.dumps(ranks)}" if ranks else "")
              + (f", alpha_pattern {json.dumps(config['alpha_pattern'])}" if config.get("alpha_pattern") else ""),
              f"- {n_params:,} parameters", ""]

    training = []
    cfg = run.config
    if cfg.get("train_data"):
        training.append(f"- data: `{Path(str(cfg['train_data'])).name}`")
    training += _settings(cfg)
    steps = adapter_meta.get("training.steps")
    if isinstance(steps, int):
        training.append(f"- steps: {steps}")
    for k, v in adapter_meta.items():
        if k.startswith("training.") and k not in ("training.steps", "training.epochs"):
            training.append(f"- {k[len('training.'):]}: {v}")
    if run.losses:
        first, last = min(run.losses), max(run.losses)
        training.append(f"- training loss: {run.losses[first]:.4f} at step {first}, {run.losses[last]:.4f} at "
                        f"step {last}")
    if run.val_losses:
        last = max(run.val_losses)
        training.append(f"- validation loss: {run.val_losses[last]:.4f} at step {last}")
    if training:
        lines += ["## Training", "", *training, ""]

    model_id = hub_id or "ORG/BASE_MODEL"
    max_rank = max([int(r), *(int(v) for v in ranks.values())])
    lines += [
        "## Use it", "",
        "With PEFT (transformers):", "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{model_id}")',
        f'model = PeftModel.from_pretrained(base, "{dir_name}")',
        "```", "",
        "With text-generation-inference (then `\"parameters\": {\"adapter_id\": \"myadapter\"}` in a request):", "",
        "```sh",
        f"LORA_ADAPTERS=myadapter=$PWD/{dir_name} text-generation-launcher --model-id {model_id}",
        "```", "",
        "With vLLM (a request names the adapter as its model):", "",
        "```sh",
        f"vllm serve {model_id} --enable-lora --lora-modules myadapter=$PWD/{dir_name}"
        + (f" --max-lora-rank {max_rank}" if max_rank > 16 else ""),
        "```", "",
        "With llama.cpp, the GGUF adapter it was exported from (or `ggtrain import-peft` of this directory):", "",
        "```sh",
        f"llama-cli -m {base_file or 'BASE.gguf'} --lora {adapter_file}",
        "```", ""]
    return "\n".join(lines)
