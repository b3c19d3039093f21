"""Where one training step's time goes: cProfile of a forward + backward + AdamW step after a warm-up
step, grouped by function (kernels are called from Python, so each kernel is one row).

    python bench/profile_step.py [-m MODEL.gguf] [-c 512] [-b 1] [-r 8] [-t 2] [--no-checkpointing] [--top 25]

The batch is real text (a licence from /usr/share/common-licenses), LoRA rank r (alpha 2r) on the
7 projections. Prints the top functions by own time, then by cumulative time.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/tokenize.py would shadow the standard library's tokenize (pstats, numba, linecache import it):
# bench/ goes to the end of the path, where only our helper module is looked up.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

import argparse
import cProfile
import io
import pstats
import time

from benchutil import load_average

TEXT = Path("/usr/share/common-licenses/GPL-3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M Q4_K_M)")
    ap.add_argument("-c", "--ctx", type=int, default=512, help="tokens per row (default 512)")
    ap.add_argument("-b", "--batch", type=int, default=1, help="rows (default 1)")
    ap.add_argument("-r", "--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads (default 2)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--top", type=int, default=25, help="rows of each table (default 25)")
    args = ap.parse_args()

    import numpy as np

    from ggtrain.gguf.arch import read_hparams
    from ggtrain.gguf.defaults import default_model_path
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
    from ggtrain.model.transformer import PROJECTIONS, Batch, Model
    from ggtrain.text.tokenizer import Tokenizer
    from ggtrain.threads import set_threads
    from ggtrain.train.optim import AdamW

    set_threads(args.threads)
    mf = ModelFile(args.model or default_model_path())
    hp = read_hparams(mf)
    model = Model(mf, hp)
    n = args.ctx * args.batch
    ids = np.asarray(Tokenizer.from_model_file(mf).encode(TEXT.read_text(encoding="utf-8")), dtype=np.int32)
    ids = np.tile(ids, (n + 1) // len(ids) + 1)
    batch = Batch.from_rows(ids[:n].reshape(args.batch, args.ctx), ids[1:n + 1].reshape(args.batch, args.ctx),
                            np.ones((args.batch, args.ctx), np.float32))
    lcfg = LoraConfig.make(r=args.rank, alpha=2.0 * args.rank, targets=PROJECTIONS)
    lora = LoraWeights.init(lcfg, target_shapes(mf.tensors, lcfg, hp.n_layer), seed=0)
    model = model.with_trainable(lora)
    grads = lora.zeros_like()
    opt = AdamW({"lora": lora.flat}, lr=1e-4)

    def step(seed: int) -> float:
        grads.flat[...] = 0.0
        t0 = time.perf_counter()
        _, state = model.forward(batch, train=True, checkpointing=args.checkpointing, step_seed=seed)
        model.backward(state, grads)
        opt.step({"lora": grads.flat})
        return time.perf_counter() - t0

    warm = step(0)
    prof = cProfile.Profile()
    prof.enable()
    secs = step(1)
    prof.disable()
    print(f"{n} tokens, checkpointing {'on' if args.checkpointing else 'off'}, threads {args.threads}: warm-up "
          f"step {warm:.1f} s, profiled step {secs:.1f} s ({n / secs:.1f} tokens/s); {load_average()}")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(args.top)
        text = buf.getvalue()
        print(text[text.index("ncalls"):] if "ncalls" in text else text)


if __name__ == "__main__":
    main()
