"""Memory: estimate a training step's peak from the model's dims, choose the micro-batch that fits,
and watch RSS while training.

The estimate follows what ggtrain.model keeps (T = micro_batch · ctx tokens, f32 = 4 bytes):
- the base weights, mmap'd and all touched every step: the model file's size;
- what a block keeps for its backward: BlockCache's declared arrays (ggtrain.model.saved) at these
  dims and options, with each trained projection's LoraCache — for every layer without
  checkpointing; with it, every layer's BlockCheckpoint (its input and two projections' outputs, or
  four with keep_ffn) plus one block recomputed in backward;
- after the blocks, the chunked cross-entropy (two (T, chunk) blocks of logits, as the next chunk's
  product is made before the last is dropped) and then the blocks' backward (the gradients at
  block_backward's widest point, BlockCache.BACKWARD_PEAK): never live at once, so the larger
  counts, beside the final norm's input and output and dL/dh. (The block recomputed under
  checkpointing is not live during the cross-entropy either; it is counted with it all the same,
  on the safe side);
- LoRA parameters, gradients, Adam m and v and the optimizer's scratch (5 f32 per parameter; a
  checkpoint save's 2 more copies come between steps, when the step's arrays are gone);
- the kernels' own buffers: qmatmul's dequantized tiles, attention's per-thread dq, and what
  OpenBLAS and Numba allocate outside numpy (measured, KERNEL_BYTES_PER_THREAD);
- the interpreter with numpy/numba/scipy and the compiled kernels, the model file's metadata, the
  tokenizer (both grow with the vocabulary) and the data (runtime_bytes);
then a safety margin. bench/step_memory.py sets it beside the measured peak RSS of a real step.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any

import psutil

from ggtrain.errors import GGTrainError
from ggtrain.kernels.loss import CE_CHUNK
from ggtrain.model.lora import LoraConfig
from ggtrain.model.saved import BlockCache, BlockCheckpoint, projection_shapes
from ggtrain.rss import MemoryMonitor  # noqa: F401  (the trainer's monitor, also imported from here)

F32 = 4
MiB = 1 << 20
GiB = 1 << 30
# python + numpy/scipy/numba, ggtrain's compiled kernels and their JIT code, the CLI, the data (measured)
RUNTIME_BASE_BYTES = 150 * MiB
RUNTIME_BYTES_PER_VOCAB = 400  # the model file's token metadata and the tokenizer, per vocabulary entry
TILE_BYTES = 2 * MiB  # a qmatmul thread's dequantized tile (ggtrain.kernels' TILE_BUDGET floats)
KERNEL_BYTES_PER_THREAD = 8 * MiB  # OpenBLAS's packing buffers, Numba's arrays: outside numpy, measured
SAFETY_FRACTION = 0.08  # the parts above already sit 1-6% over the measured peak (bench/step_memory.py)
DEFAULT_LIMIT_SHARE = 0.8  # share of the available RAM a run may take by default


def lora_param_count(hparams: Any, lora_config: LoraConfig) -> int:
    """Number of LoRA parameters (A and B of every adapted tensor) for these dims."""
    shapes = projection_shapes(hparams)
    n = 0
    for t, spec in lora_config.targets.items():
        o, i = shapes[t]
        n += spec.rank * (o + i) * (1 if t == "output" else int(hparams.n_layer))
    return n


def default_runtime_bytes(hparams: Any) -> int:
    """What a run holds besides the model's weights and the step: the interpreter and libraries,
    the token metadata and the tokenizer (they grow with the vocabulary)."""
    return RUNTIME_BASE_BYTES + RUNTIME_BYTES_PER_VOCAB * int(hparams.n_vocab)


def memory_breakdown(hparams: Any, lora_config: LoraConfig, ctx: int, micro_batch: int, checkpointing: bool,
                     model_file_bytes: int, threads: int | None = None, ce_chunk: int = CE_CHUNK,
                     runtime_bytes: int | None = None, compute: str = "f32", keep_ffn: bool = False
                     ) -> dict[str, int]:
    """Peak bytes of one training step by part (see the module doc); 'total' includes the margin.
    compute "bf16": the products also hold their input rounded to bf16 (2 bytes a value), the widest
    being the head chunk's output gradient (T, ce_chunk) in its backward. keep_ffn: the checkpoints
    hold the FFN's gate and up outputs too (Model.forward's keep_ffn)."""
    if ctx <= 0 or micro_batch <= 0:
        raise ValueError("ctx and micro_batch must be > 0")
    threads = threads or os.cpu_count() or 1
    T = ctx * micro_batch
    n_layer, n_vocab = int(hparams.n_layer), int(hparams.n_vocab)
    x = T * int(hparams.n_embd) * F32  # one (T, d) activation
    cache = BlockCache.nbytes(hparams, lora_config.targets, T)

    parts: dict[str, int] = {}
    parts["weights (mmap'd model file)"] = int(model_file_bytes)
    if checkpointing:
        parts["activations (block checkpoints + one block recomputed)"] = (
            n_layer * BlockCheckpoint.nbytes(hparams, T, keep_ffn) + cache)
    else:
        parts["activations (all blocks)"] = n_layer * (x + cache)
    ce = 2 * T * min(ce_chunk, n_vocab) * F32 + 2 * x  # two chunks of logits, dh's accumulator and product
    if "output" in lora_config.targets:
        ce += 2 * T * lora_config.targets["output"].rank * F32
    backward = BlockCache.backward_peak_bytes(hparams, T) + x  # + the block's dx
    parts["cross-entropy or a block's backward, the larger (+ final norm)"] = 3 * x + max(ce, backward)
    n_lora = lora_param_count(hparams, lora_config)
    parts["LoRA params, grads, Adam state (m, v, scratch)"] = 5 * n_lora * F32
    attn_dq = T * int(hparams.n_head) * int(hparams.head_dim) * F32
    rounded = 2 * T * max(min(ce_chunk, n_vocab), int(hparams.n_ff), int(hparams.n_embd)) if compute == "bf16" else 0
    parts["kernel buffers (qmatmul tiles, attention dq, BLAS)"] = threads * (TILE_BYTES + attn_dq
                                                                             + KERNEL_BYTES_PER_THREAD) + rounded
    if runtime_bytes is None:
        runtime_bytes = default_runtime_bytes(hparams)
    parts["runtime (python, libraries, tokenizer, data)"] = int(runtime_bytes)
    subtotal = sum(parts.values())
    parts["safety margin"] = int(SAFETY_FRACTION * subtotal)
    parts["total"] = subtotal + parts["safety margin"]
    return parts


def estimate_step_memory(hparams: Any, lora_config: LoraConfig, ctx: int, micro_batch: int, checkpointing: bool,
                         model_file_bytes: int, **kw: Any) -> int:
    """Estimated peak RSS in bytes of a training step (kw: threads, ce_chunk, runtime_bytes, compute,
    keep_ffn)."""
    return memory_breakdown(hparams, lora_config, ctx, micro_batch, checkpointing, model_file_bytes, **kw)["total"]


def _divisors_desc(n: int) -> list[int]:
    small = [k for k in range(1, int(n ** 0.5) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]), reverse=True)


def _ranks(lora_config: LoraConfig) -> str:
    ranks = {t: spec.rank for t, spec in lora_config.targets.items()}
    if len(set(ranks.values())) == 1:
        return f"LoRA rank {next(iter(ranks.values()))}"
    return "LoRA ranks " + ", ".join(f"{t} {r}" for t, r in ranks.items())


def _too_big(limit: int, limit_given: bool, what: str, parts: dict[str, int], hints: list[str]) -> GGTrainError:
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if k != "total")
    lim = (f"--mem-limit {format_bytes(limit)}" if limit_given else
           f"the memory limit {format_bytes(limit)} (a share of the available RAM; --mem-limit sets it)")
    return GGTrainError(f"{lim} is too small: {what} needs about {format_bytes(parts['total'])} ({detail}); "
                        + ", or ".join(hints))


def choose_micro_batch(batch: int, limit: int, hparams: Any, lora_config: LoraConfig, ctx: int,
                       checkpointing: bool, model_file_bytes: int, limit_given: bool = True, **kw: Any) -> int:
    """The largest micro-batch dividing `batch` whose step fits in `limit` bytes.

    The effective batch stays `batch` through gradient accumulation (batch // micro_batch micro-steps
    of equal size). A limit that even micro-batch 1 exceeds is a GGTrainError with the numbers.
    """
    if batch <= 0:
        raise GGTrainError(f"--batch must be > 0, got {batch}")
    for mb in _divisors_desc(batch):
        if estimate_step_memory(hparams, lora_config, ctx, mb, checkpointing, model_file_bytes, **kw) <= limit:
            return mb
    parts = memory_breakdown(hparams, lora_config, ctx, 1, checkpointing, model_file_bytes, **kw)
    hints = ["raise --mem-limit", "lower --ctx"]
    if not checkpointing:
        parts_ck = memory_breakdown(hparams, lora_config, ctx, 1, True, model_file_bytes, **kw)
        hints.insert(1, f"use --use-checkpointing (needs about {format_bytes(parts_ck['total'])})")
    hints.append("lower the LoRA ranks (--lora-r, --rank-*)")
    what = f"one training step at --ctx {ctx}, micro-batch 1, {_ranks(lora_config)}"
    raise _too_big(limit, limit_given, what, parts, hints)


def check_fits(batch: int, micro_batch: int, limit: int, hparams: Any, lora_config: LoraConfig, ctx: int,
               checkpointing: bool, model_file_bytes: int, limit_given: bool = True, **kw: Any) -> int:
    """The micro-batch a run will use: `micro_batch` when given (0: the largest that fits), refusing
    settings whose training step cannot fit in `limit` bytes. Called before the model, the data or
    the LoRA weights are allocated, so a rank or --ctx far too big fails at once with the estimate."""
    if not micro_batch:
        return choose_micro_batch(batch, limit, hparams, lora_config, ctx, checkpointing, model_file_bytes,
                                  limit_given=limit_given, **kw)
    parts = memory_breakdown(hparams, lora_config, ctx, micro_batch, checkpointing, model_file_bytes, **kw)
    if parts["total"] > limit:
        what = f"one training step at --ctx {ctx}, --micro-batch {micro_batch}, {_ranks(lora_config)}"
        hints = ["use a smaller --micro-batch (0 chooses one that fits)", "raise --mem-limit", "lower --ctx"]
        raise _too_big(limit, limit_given, what, parts, hints)
    return micro_batch


CHECKPOINT_FFN_MODES = ("auto", "on", "off")  # --checkpoint-ffn


def choose_keep_ffn(mode: str, limit: int, hparams: Any, lora_config: LoraConfig, ctx: int, micro_batch: int,
                    checkpointing: bool, model_file_bytes: int, **kw: Any) -> bool:
    """Whether the checkpoints also keep the FFN's gate and up outputs (--checkpoint-ffn): "on" and
    "off" as said (nothing to keep without checkpointing); "auto" when the step at this micro-batch
    still fits `limit` (0: none) with them. The micro-batch is chosen first, without them: a larger
    micro-batch is worth more than the ~7% of a step's FLOPs they save."""
    if mode not in CHECKPOINT_FFN_MODES:
        raise ValueError(f"checkpoint_ffn: {mode!r} is not one of {', '.join(CHECKPOINT_FFN_MODES)}")
    if not checkpointing or mode == "off":
        return False
    if mode == "on" or not limit:
        return True
    kw = {**kw, "keep_ffn": True}
    return estimate_step_memory(hparams, lora_config, ctx, micro_batch, True, model_file_bytes, **kw) <= limit


def smaller_micro_batch(batch: int, micro_batch: int) -> int | None:
    """The next micro-batch below `micro_batch` that divides `batch` (what to shrink to when RSS nears
    the limit mid-run), or None at 1."""
    for mb in _divisors_desc(batch):
        if mb < micro_batch:
            return mb
    return None


def _cgroup_limit() -> int | None:
    """The container's memory limit (cgroup v2 or v1), if any."""
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            v = Path(p).read_text().strip()
            if v != "max" and int(v) < (1 << 60):
                return int(v)
    return None


def default_mem_limit(share: float = DEFAULT_LIMIT_SHARE) -> int:
    """What this process may grow to: its current RSS plus `share` of the RAM available now,
    never more than 90% of the machine's (or the container's) memory."""
    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    cap = int(0.9 * vm.total)
    cg = _cgroup_limit()
    if cg is not None:
        cap = min(cap, int(0.9 * cg))
    return min(cap, rss + int(share * vm.available))


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'8G', '512M', '1.5GiB', '2000000' -> bytes (K/M/G/T are powers of 1024, as RAM is counted)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise GGTrainError(f"cannot read memory size {text!r} (examples: 8G, 512M, 1.5GiB)")
    mult = {"": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    n = float(m.group(1)) * mult
    if not math.isfinite(n) or n >= 1 << 80:  # a yottabyte: no machine's RAM, and a float that stays exact
        raise GGTrainError(f"memory size {text!r} is too large (examples: 8G, 512M, 1.5GiB)")
    return int(n)


def format_bytes(n: float) -> str:
    """1536 MiB -> '1.50 GiB'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
