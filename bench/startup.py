"""Start-up cost of the light commands: wall and CPU time of `ggtrain --help` and `ggtrain tokenize -p
Hello --ids` (a fresh process each run, best and median of --repeat), and which ggtrain.kernels
modules and how much of scipy.linalg (the BLAS the quantized matmul calls) each command imported.

    python bench/startup.py [--repeat 7]

One unrecorded run of each command comes first (it fills Numba's cache for the tokenizer's kernels).
"""

from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (tokenize.py): keep it off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import json
import statistics
import subprocess
import time

COMMANDS = [["--help"], ["tokenize", "-p", "Hello", "--ids"]]

# Runs the CLI in this process, then reports what it imported (stdout is the command's own output).
_IMPORTED = ("import json, sys\n"
             "from ggtrain.cli.main import main\n"
             "try:\n"
             "    main(sys.argv[1:], prog_name='ggtrain')\n"
             "except SystemExit:\n"
             "    pass\n"
             "mods = sorted(m for m in sys.modules if m.startswith(('ggtrain.kernels', 'scipy.linalg')))\n"
             "print(json.dumps(mods), file=sys.stderr)\n")


def seconds(args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of the command in a fresh process; CPU time (user + system,
    all its threads) is the steadier figure on a busy machine."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ggtrain.cli.main", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"ggtrain {' '.join(args)} exited with {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def imported(args: list[str]) -> list[str]:
    r = subprocess.run([sys.executable, "-c", _IMPORTED, *args], check=True, capture_output=True, text=True)
    return json.loads(r.stderr.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    a, b, c = os.getloadavg()
    print(f"load average {a:.2f} {b:.2f} {c:.2f}, {args.repeat} runs each")
    for cmd in COMMANDS:
        seconds(cmd)  # warm-up: Numba cache, page cache
        wall, cpu = zip(*(seconds(cmd) for _ in range(args.repeat)))
        mods = imported(cmd)
        kernels = [m.removeprefix("ggtrain.kernels.") for m in mods if m.startswith("ggtrain.kernels.")]
        n_linalg = sum(m.startswith("scipy.linalg") for m in mods)
        print(f"ggtrain {' '.join(cmd):28s} wall best {min(wall):.3f} s, median {statistics.median(wall):.3f} s; "
              f"CPU best {min(cpu):.3f} s, median {statistics.median(cpu):.3f} s")
        print(f"    ggtrain.kernels.* imported: {', '.join(kernels) or '-'}; scipy.linalg modules: {n_linalg}")


if __name__ == "__main__":
    main()
