"""What installing and importing ggtrain leaves where."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_numba_cache_stays_out_of_the_package(tmp_path: Path) -> None:
    # Files Numba writes next to the installed kernels survive a pip uninstall and make the next
    # install's ggtrain a namespace package; they must go to the user's cache instead.
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = ("import ggtrain.kernels.norm as n, numba, numpy as np; "
            "n.rmsnorm_forward(np.ones((2, 4), np.float32), np.ones(4, np.float32), 1e-6); "
            "print(numba.config.CACHE_DIR); print(n.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       check=True)
    cache_dir, module = r.stdout.split()
    assert Path(cache_dir) == tmp_path / "ggtrain" / "numba"
    assert any(Path(cache_dir).rglob("*.nbi")), "nothing was cached"
    package = Path(module).parent
    assert not Path(cache_dir).resolve().is_relative_to(package.resolve())
