"""The PyTorch + PEFT side of bench/train.py: LoRA training steps on a GGUF model that transformers'
GGUF loader dequantizes (to float32, or with --dtype bf16 to bfloat16: the base weights and activations
in bf16, the LoRA weights float32 as PEFT keeps them), on the very token batches ggtrain trains on.

    PYTHON bench/peft_baseline.py --model M.gguf --batches B.npz --threads 2 [--dtype f32|bf16] [--lr 1e-4]
        [--rank 8] [--alpha 16] [--no-checkpointing]

Needs torch, transformers and peft (not ggtrain: any interpreter that has those can run it, e.g. a
venv made with --system-site-packages). B.npz holds tokens/targets/mask/positions (steps, rows, ctx)
int32/float32 as bench/train.py writes them; every row is one sample (no packing). The loss is
ggtrain's: mean cross-entropy over the trained targets, computed from the full logits.
Prints one JSON line: per-step seconds and losses, the peak RSS of the training steps (VmHWM reset
after the model is loaded) and of the whole process.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

# bench/tokenize.py would shadow the standard library's tokenize (torch, linecache import it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def vm_hwm() -> int:
    m = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--batches", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="the base model's dtype")
    args = ap.parse_args()

    import numpy as np
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model.parent, gguf_file=args.model.name,
                                                 dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    model.config.use_cache = False  # training: no KV cache
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS,
                             bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    data = np.load(args.batches)
    tokens = torch.from_numpy(data["tokens"].astype(np.int64))
    positions = torch.from_numpy(data["positions"].astype(np.int64))
    labels = torch.from_numpy(np.where(data["mask"] > 0, data["targets"], -100).astype(np.int64))
    load_s = time.perf_counter() - t0
    gc.collect()
    load_peak = vm_hwm()
    Path("/proc/self/clear_refs").write_text("5")  # the training steps' own peak from here

    seconds, losses = [], []
    for s in range(tokens.shape[0]):
        t0 = time.perf_counter()
        logits = model(input_ids=tokens[s], position_ids=positions[s],
                       attention_mask=torch.ones_like(tokens[s])).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[s].reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        del logits
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    print(json.dumps({"seconds": seconds, "losses": losses, "train_peak": vm_hwm(), "load_peak": load_peak,
                      "load_s": load_s, "dtype": args.dtype,
                      "lora_dtypes": sorted({str(p.dtype) for p in params}), "n_lora": sum(p.numel() for p in params),
                      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "peft": peft.__version__}}), flush=True)


if __name__ == "__main__":
    main()
