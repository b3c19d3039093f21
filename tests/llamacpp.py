"""llama.cpp as the outside reference: its source tree, its models/ folder and a few built tools.

The source comes from the PyPI sdist of llama-cpp-python (which vendors llama.cpp, models/ with the
ggml-vocab-*.gguf test vocabularies included), fetched with pip once and cached:

    $GGTRAIN_CACHE (default ~/.cache/ggtrain)/llama.cpp-0.3.36/
        source/       llama.cpp tree (vendor/llama.cpp of the sdist)
        build-KEY/    CMake build directory (incremental; may be half-done after an interrupt)
        bin-KEY/      the built tools, copied here and renamed into place only when the build succeeded
                      (KEY: a hash of the CMake options, which name the CPU's SIMD levels)
    $GGTRAIN_CACHE/llama.cpp-0.3.36.lock   fcntl lock: one process fetches / builds, others wait

GGTRAIN_LLAMACPP_SDIST=/path/llama_cpp_python-0.3.36.tar.gz uses a local copy of that sdist instead of
downloading it (offline machines). Importable as a plain module from tests/ and bench/.

`with server(model, "--lora", a, ...) as url:` runs llama-server on 127.0.0.1 (a free port) for the
block and stops it after; http_json(url + "/lora-adapters") talks to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
# The tools the tests and benches use; built in one `cmake --build` of just these targets.
TARGETS = ("llama-perplexity", "llama-tokenize", "llama-completion", "llama-server",
           "llama-quantize", "llama-export-lora")
# What the reference is built for: the SIMD levels this CPU has, named explicitly, never
# GGML_NATIVE (-march=native). On this machine kind's Intel Xeons a native build enables AMX,
# whose kernels die with SIGILL in a worker thread (`tilezero`); AMX stays off everywhere.
# /proc/cpuinfo flags -> the ggml CMake option that needs them (all of them).
_X86_FEATURE_OPTIONS = (
    (("sse4_2",), "GGML_SSE42"),
    (("avx",), "GGML_AVX"),
    (("avx2",), "GGML_AVX2"),
    (("fma",), "GGML_FMA"),
    (("f16c",), "GGML_F16C"),
    (("bmi2",), "GGML_BMI2"),
    (("avx_vnni",), "GGML_AVX_VNNI"),
    (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "GGML_AVX512"),
    (("avx512vbmi",), "GGML_AVX512_VBMI"),
    (("avx512_vnni",), "GGML_AVX512_VNNI"),
    (("avx512_bf16",), "GGML_AVX512_BF16"),
)
_AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def simd_options(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """-DGGML_<feature>=ON|OFF for every x86 level llama.cpp knows, from the CPU's flags; AMX off.

    Off x86 (no such flags), only GGML_NATIVE=OFF: ggml's portable defaults for that platform.
    """
    flags = cpu_flags() if flags is None else flags
    opts = ["-DGGML_NATIVE=OFF"]
    if "sse2" not in flags:  # not x86
        return tuple(opts)
    for needs, option in _X86_FEATURE_OPTIONS:
        opts.append(f"-D{option}={'ON' if all(f in flags for f in needs) else 'OFF'}")
    opts += [f"-D{option}=OFF" for option in _AMX_OPTIONS]
    return tuple(opts)


CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    *simd_options(),
    "-DLLAMA_OPENSSL=OFF",  # no network code paths (LLAMA_CURL is gone in this version)
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the server build fetches its web UI from Hugging Face
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DGGML_OPENMP=ON",
)
BUILD_JOBS = int(os.environ.get("GGTRAIN_BUILD_JOBS", "2"))

# llama.cpp's logger writes from a background thread and its singleton is never destroyed, so a
# tool's last lines (llama-perplexity's "Final estimate") are lost when the process exits before
# that thread ran (upstream issue 22142; frequent on a loaded machine). This one-line patch joins
# the logger thread at exit; it touches logging only, nothing that computes.
_LOG_PATCH_MARK = "ggtrain: flush the log at exit"
_LOG_PATCH_AFTER = "        log = new common_log;"
_LOG_PATCH = (f"\n        std::atexit([]() {{ log->pause(); }});  // {_LOG_PATCH_MARK}")
# Identifies what bin/ was built from: a change here rebuilds (incrementally).
BUILD_STAMP = json.dumps({"version": VERSION, "targets": TARGETS, "options": CMAKE_OPTIONS,
                          "patches": [_LOG_PATCH_MARK]}, sort_keys=True)
# build/ and bin/ are keyed by the compile options, so machines with other CPUs never share tools.
BUILD_KEY = hashlib.sha256(json.dumps(CMAKE_OPTIONS).encode()).hexdigest()[:12]


def _log(msg: str) -> None:
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """$GGTRAIN_CACHE or ~/.cache/ggtrain, created."""
    root = Path(os.environ.get("GGTRAIN_CACHE") or Path.home() / ".cache" / "ggtrain")
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir() -> Path:
    """The per-version directory holding source/, build/ and bin/."""
    d = cache_root() / f"llama.cpp-{VERSION}"
    d.mkdir(parents=True, exist_ok=True)
    return d


_lock_held = [False]  # whether this process holds the lock: bin_dir's build fetches the source under it


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Exclusive lock across processes (pytest-xdist workers, a bench running next to the tests);
    re-entrant within one (a second flock on a new open file would wait for the first forever): only
    the outermost hold takes and releases it."""
    if _lock_held[0]:
        yield
        return
    lock_path = cache_root() / f"llama.cpp-{VERSION}.lock"
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process holding {lock_path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        _lock_held[0] = True
        try:
            yield
        finally:
            _lock_held[0] = False
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_sdist(dest: Path) -> Path:
    """The sdist tarball: $GGTRAIN_LLAMACPP_SDIST if set, else `pip download` into dest."""
    local = os.environ.get("GGTRAIN_LLAMACPP_SDIST")
    if local:
        if not Path(local).is_file():
            raise FileNotFoundError(f"GGTRAIN_LLAMACPP_SDIST={local}: no such file")
        return Path(local)
    _log(f"downloading the {PACKAGE}=={VERSION} sdist with pip")
    # --no-build-isolation: pip only reads metadata, so it need not install the build backend.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--no-binary", ":all:", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"pip download failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    found = sorted(dest.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no sdist in {dest}: {os.listdir(dest)}")
    return found[0]


def _extract_vendor(sdist: Path, dest: Path) -> None:
    """Extract <top>/vendor/llama.cpp/** of the sdist into dest (the llama.cpp root)."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 3)
            if len(parts) >= 3 and parts[1] == "vendor" and parts[2] == "llama.cpp":
                rel = parts[3] if len(parts) == 4 else ""
                if not rel or not (m.isfile() or m.isdir() or m.issym()):
                    continue
                m.name = rel
                members.append(m)
        if not members:
            raise RuntimeError(f"{sdist}: no vendor/llama.cpp inside")
        tar.extractall(dest, members=members, filter="tar")


def source_dir() -> Path:
    """The llama.cpp source tree (CMakeLists.txt, src/, tools/, models/), fetched once and cached."""
    src = cache_dir() / "source"
    if (src / "CMakeLists.txt").is_file():
        return src
    with _locked():
        if (src / "CMakeLists.txt").is_file():
            return src
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="fetch-") as tmp:
            t0 = time.time()
            sdist = _fetch_sdist(Path(tmp))
            staging = Path(tmp) / "source"
            staging.mkdir()
            _extract_vendor(sdist, staging)
            _patch_source(staging)
            if src.exists():  # an earlier half-finished attempt
                shutil.rmtree(src)
            staging.rename(src)  # atomic: source/ exists only when complete
            _log(f"llama.cpp source ready in {src} ({time.time() - t0:.0f} s)")
    return src


def _patch_source(src: Path) -> None:
    """Apply the logging patch above (idempotent)."""
    log_cpp = src / "common" / "log.cpp"
    text = log_cpp.read_text()
    if _LOG_PATCH_MARK in text:
        return
    if text.count(_LOG_PATCH_AFTER) != 1:
        raise RuntimeError(f"{log_cpp}: cannot apply the log-flush patch (anchor not found)")
    text = text.replace(_LOG_PATCH_AFTER, _LOG_PATCH_AFTER + _LOG_PATCH)
    if "#include <cstdlib>" not in text:
        text = "#include <cstdlib>\n" + text
    tmp = log_cpp.with_suffix(".cpp.tmp")
    tmp.write_text(text)
    os.replace(tmp, log_cpp)


def models_dir() -> Path:
    """llama.cpp's models/ folder: ggml-vocab-*.gguf, their .inp/.out test vectors, templates/."""
    return source_dir() / "models"


def _built(out: Path) -> bool:
    stamp = out / "BUILD_STAMP"
    return (stamp.is_file() and stamp.read_text() == BUILD_STAMP
            and all((out / t).is_file() for t in TARGETS))


def build_dir() -> Path:
    """The CMake build directory of this machine's options (its static libraries link test tools)."""
    return cache_dir() / f"build-{BUILD_KEY}"


def bin_dir() -> Path:
    """Directory of the built tools (building them all first if needed)."""
    out = cache_dir() / f"bin-{BUILD_KEY}"
    if not _built(out):
        with _locked():
            if not _built(out):
                _build(out)
    _verify(out)
    return out


_verified: set[Path] = set()


def _verify(out: Path) -> None:
    """Check once per process that the built tools run here: a one-chunk perplexity on a tiny model.

    A build for the wrong CPU dies with SIGILL; say so plainly instead of failing every comparison.
    """
    if out in _verified:
        return
    import tinymodels  # lazily: tinymodels needs this module for its vocabularies

    model = out / "verify-model.gguf"  # here, not in tinymodels' cache, which tests list
    if not model.is_file():
        tmp = out / f".verify-model.{os.getpid()}.tmp"
        tinymodels.write_uncached(tmp, "llama", "Q8_0")
        os.replace(tmp, model)
    text = cache_dir() / "verify.txt"
    if not text.is_file():
        text.write_text(" ".join(f"word{i % 97} and {i}" for i in range(400)) + "\n")
    cmd = [str(out / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "128", "-b", "128",
           "-t", "2", "--chunks", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          errors="replace")
    if proc.returncode or "Final estimate" not in proc.stdout + proc.stderr:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        raise RuntimeError(f"the llama.cpp tools built in {out} do not run on this CPU ({how}); "
                           f"built with {' '.join(o for o in CMAKE_OPTIONS if 'GGML_' in o)}. "
                           f"Command: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    _verified.add(out)


def _build(out: Path) -> None:
    src = source_dir()
    _patch_source(src)  # a tree fetched before the patch existed
    build = build_dir()
    t0 = time.time()
    _log(f"building llama.cpp {VERSION} ({', '.join(TARGETS)}) in {build} with -j {BUILD_JOBS}; "
         "this takes a while on a small machine (once, then cached)")
    if not (build / "CMakeCache.txt").is_file():
        _stream(["cmake", "-S", str(src), "-B", str(build), *CMAKE_OPTIONS], "configure")
    _stream(["cmake", "--build", str(build), "--config", "Release", "-j", str(BUILD_JOBS),
             "--target", *TARGETS], "build")
    # Each tool replaces its old copy atomically (running processes keep theirs); the stamp,
    # written last, is what marks bin/ complete, so an interrupted build is never taken as done.
    out.mkdir(exist_ok=True)
    (out / "BUILD_STAMP").unlink(missing_ok=True)
    for t in TARGETS:
        tmp = out / f".{t}.tmp"
        shutil.copy2(build / "bin" / t, tmp)
        os.replace(tmp, out / t)
    (out / "BUILD_STAMP.tmp").write_text(BUILD_STAMP)
    os.replace(out / "BUILD_STAMP.tmp", out / "BUILD_STAMP")
    _log(f"llama.cpp tools ready in {out} (build took {time.time() - t0:.0f} s)")


def _stream(cmd: list[str], what: str) -> None:
    """Run a build step, echoing progress lines to stderr; raise with the tail of output on failure."""
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-60:]
        if line.startswith("[") or "error" in line.lower():
            print(f"[llamacpp {what}] {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait():
        raise RuntimeError(f"llama.cpp {what} failed ({proc.returncode}): {' '.join(cmd)}\n"
                           + "\n".join(tail))


def binary(name: str) -> Path:
    """Path of a built llama.cpp tool, e.g. binary("llama-perplexity"); builds all TARGETS once."""
    if name not in TARGETS:
        raise ValueError(f"{name} is not among the built targets {TARGETS}")
    return bin_dir() / name


def run(name: str, *args: str | os.PathLike, timeout: float = 600, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool, capturing stdout and stderr as text.

    check=True raises RuntimeError with the output's tail when the exit code is not 0.
    """
    cmd = [str(binary(name)), *map(str, args)]
    env = dict(os.environ)
    env.setdefault("LLAMA_LOG_COLORS", "0")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False,
                          input=input, errors="replace")
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


_CHUNK_RE = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf|-?nan)")
_FINAL_RE = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf) \+/- ([0-9.eE+-]+|nan|inf)")


def parse_perplexity(output: str) -> tuple[float, float, list[float]]:
    """(final PPL, its +/- error, running estimate after each chunk) from llama-perplexity's output."""
    m = _FINAL_RE.search(output)
    if not m:
        raise ValueError("no 'Final estimate: PPL = X +/- E' in llama-perplexity's output:\n"
                         + output[-3000:])
    chunks = [float(v) for _, v in sorted(((int(i), v) for i, v in _CHUNK_RE.findall(output)))]
    return float(m.group(1)), float(m.group(2)), chunks


def perplexity(model: str | os.PathLike, text_file: str | os.PathLike, ctx: int = 128,
               threads: int = 2, batch: int | None = None, lora: Sequence = (),
               chunks: int | None = None, extra: Sequence[str] = (), timeout: float = 1200
               ) -> tuple[float, list[float]]:
    """llama-perplexity's (final PPL, running estimate per chunk) on text_file at context ctx.

    lora: adapter paths, or (path, scale) pairs for --lora-scaled.
    """
    args: list[str] = ["-m", str(model), "-f", str(text_file), "-c", str(ctx), "-t", str(threads),
                       "-b", str(batch or ctx)]
    for item in lora:
        if isinstance(item, (tuple, list)):
            args += ["--lora-scaled", f"{item[0]}:{item[1]}"]  # this llama.cpp takes FNAME:SCALE
        else:
            args += ["--lora", str(item)]
    if chunks is not None:
        args += ["--chunks", str(chunks)]
    args += list(extra)
    # llama.cpp logs from a background thread and could exit before writing the last lines; the
    # source patch (_LOG_PATCH) fixes that, and a rerun (the run is deterministic) stays as a guard.
    for attempt in range(3):
        proc = run("llama-perplexity", *args, timeout=timeout)
        try:
            final, _err, per_chunk = parse_perplexity(proc.stdout + "\n" + proc.stderr)
            return final, per_chunk
        except ValueError:
            if attempt == 2:
                raise
            _log("llama-perplexity's output lacks the final estimate; running it again")
    raise AssertionError("unreachable")


_INFO_RE = re.compile(r"print_info: (\S[^=]*?)\s*= (.*)$", re.MULTILINE)
_SWA_RE = re.compile(r"load_tensors: layer +(\d+) assigned to device \S+, is_swa = (\d)")


def load_info(model: str | os.PathLike, timeout: float = 300) -> dict[str, object]:
    """What llama.cpp reports while loading model: its `print_info: key = value` lines (values as
    strings, e.g. info["n_embd"] == "640") plus info["is_swa"], the per-layer sliding-window flags
    from the verbose load log. Loads the model with llama-completion and generates one token."""
    proc = run("llama-completion", "-m", str(model), "-p", "hi", "-n", "1", "-no-cnv",
               "--no-warmup", "-c", "64", "-t", "2", "-v", "--log-colors", "off",
               timeout=timeout, input="")
    text = proc.stdout + "\n" + proc.stderr
    info: dict[str, object] = {k.strip(): v.strip() for k, v in _INFO_RE.findall(text)}
    if "n_embd" not in info:
        raise RuntimeError(f"no print_info lines in llama-completion's load log:\n{text[-3000:]}")
    # The model may be loaded twice (parameter fitting); layer n_layer is the output layer.
    layers = {int(i): v == "1" for i, v in _SWA_RE.findall(text)}
    info["is_swa"] = [layers[i] for i in range(int(str(info["n_layer"]))) if i in layers]
    return info



# -- llama-server -------------------------------------------------------------------------------
# Requests go straight to the loopback server, never through an http_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(url: str, body: Any = None, timeout: float = 120) -> Any:
    """GET url (body None) or POST body as JSON; the decoded JSON answer.

    An HTTP error status raises RuntimeError with the server's error body."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{'POST' if data else 'GET'} {url} -> HTTP {e.code}: "
                           f"{e.read().decode(errors='replace')[:2000]}") from None


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `grace` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.is_file() else ""


def _healthy(url: str) -> bool:
    try:
        with _NO_PROXY.open(url + "/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):  # refused while starting, 503 while loading
        return False


@contextlib.contextmanager
def server(model: str | os.PathLike, *args: str | os.PathLike, startup_timeout: float = 300,
           attempts: int = 3) -> Iterator[str]:
    """Run llama-server on `model` with `args`, bound to 127.0.0.1 on a free port; yield its base URL
    ("http://127.0.0.1:PORT") once GET /health says it is ready; always stop it on exit.

    The port is one the OS just handed out for 127.0.0.1; if another process takes it first (the
    server cannot bind), a new port is tried, `attempts` times in all. Startup that exceeds
    `startup_timeout` seconds, or a server that exits, raises RuntimeError with its log's tail.
    """
    args = tuple(map(str, args))
    for flag in ("--host", "--port"):
        if flag in args:
            raise ValueError(f"server() chooses {flag} itself (127.0.0.1 and a free port)")
    env = dict(os.environ)
    env.setdefault("LLAMA_LOG_COLORS", "0")
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        log = Path(tmp) / "server.log"
        proc, url = None, ""
        for attempt in range(attempts):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [str(binary("llama-server")), "-m", str(model), *args, "--host", "127.0.0.1",
                   "--port", str(port)]
            with open(log, "wb") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env)
            deadline = time.monotonic() + startup_timeout
            try:
                while proc.poll() is None and time.monotonic() < deadline and not _healthy(url):
                    time.sleep(0.2)
            except BaseException:
                _stop(proc)
                raise
            exited = proc.poll() is not None
            if not exited and time.monotonic() < deadline:
                break  # healthy
            _stop(proc)
            if exited and "couldn't bind" in _tail(log) and attempt + 1 < attempts:
                _log(f"llama-server could not bind port {port}; trying another")
                continue
            why = f"exited with {proc.returncode}" if exited else f"not ready after {startup_timeout:.0f} s"
            raise RuntimeError(f"llama-server {why}: {' '.join(cmd)}\n{_tail(log)}")
        assert proc is not None
        try:
            yield url
        except BaseException:
            _log(f"llama-server log (tail):\n{_tail(log)}")
            raise
        finally:
            _stop(proc)

if __name__ == "__main__":  # python tests/llamacpp.py: fetch + build now (e.g. in CI set-up)
    print(source_dir())
    print(bin_dir())
