"""Where the AMX kernel's time goes on this CPU: bench/amx_probe.c, compiled here against kernels/'s
headers with the "amx" variant's flags (the table setup.py builds bf16mm_amx from), run on one thread.

    python -P bench/amx_probe.py

It prints (all in one run, the three head-chunk figures interleaved over 40 rounds):
  - tdpbf16ps alone in 10 ms windows, lowest and highest: the tile unit's rate over time (on a VM
    that shares the physical core, it halves while the other tenant uses the tiles);
  - one output-head chunk forward (Q8_0 4096 × 640, 512 tokens): the micro-kernel's loop alone, with
    the output stores, with the packing: what each stage costs;
  - the packers' rounding, integer round to nearest even against vcvtne2ps2bf16, and the chunk's
    forward and backward pack.
Needs a C compiler (cc) and a CPU with AMX-BF16 whose tile state Linux grants; says so otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if sys.path and sys.path[0] == str(BENCH):
    sys.path.pop(0)  # bench/tokenize.py would shadow the standard library's
sys.path.append(str(BENCH))

from benchutil import cpu_model, load_average

KERNELS = BENCH.parent / "kernels"


def main() -> int:
    sys.path.insert(0, str(KERNELS))
    import variants  # kernels/variants.py by path, as setup.py loads it

    amx = variants.VARIANTS["amx"]
    print(f"cpu {cpu_model()}; {load_average()}")
    missing = [f for f in amx.cpu if f not in Path("/proc/cpuinfo").read_text().split()]
    if missing:
        print(f"this CPU lacks {', '.join(missing)}: no AMX kernel to probe")
        return 0
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("no C compiler (cc, gcc or $CC) to build the probe")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "amx_probe"
        # setup.py's flags for the kernels: no -march=native, the variant's own
        cmd = [cc, "-O3", "-fno-math-errno", "-ffp-contract=off", *amx.flags, f"-I{KERNELS}",
               str(BENCH / "amx_probe.c"), "-o", str(exe)]
        print("built with:", " ".join(cmd[1:-3]))
        subprocess.run(cmd, check=True)
        print("kernel path: AMX-BF16 tiles (tdpbf16ps), bf16mm_util.h packers, 1 thread")
        rc = subprocess.run([str(exe)], check=False).returncode
    print(load_average())
    return rc


if __name__ == "__main__":
    sys.exit(main())
