"""`moeprune deploy`: one engine server per stored pattern (its export), a fallback server, and the
routing front over them; Ctrl-C stops them all.

Each stored pattern is exported once into `exports/<name>` and re-exported only when the pattern
changed (the export records the pattern's digest). Each export is served by its own engine
process (`vllm serve` by default; any OpenAI-compatible server through a command template), bound
to the loopback interface on its own port: only the front faces clients. The fallback serves the
whole source model. The user's engine arguments (tensor/expert parallel, memory fraction, ...)
are passed through unchanged.

With `engines=N`, N swappable engines start on the first N patterns' exports instead (all with
the same experts per layer) in vLLM's dev mode with moeprune's worker extension, and the front
multiplexes every stored pattern over them (`multiplex`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoepruneError

VLLM = "vllm serve {model} --host 127.0.0.1 --port {port} --served-model-name {name}"
SWAPPABLE_ARGS = ["--worker-extension-cls", "moeprune.serve.vllm_ext.ExpertSwap"]
SWAPPABLE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # vLLM's /pause, /resume, /collective_rpc routes


def engine_command(engine: str, model: str, port: int, name: str, extra: list[str],
                   swappable: bool = False) -> list[str]:
    """The command that serves `model` on `port`: `vllm`, or a template with {model}, {port} and
    optionally {name} and {python} (this interpreter), followed by the user's engine arguments.
    `swappable`: vllm gets moeprune's worker extension (a template decides for itself)."""
    template = VLLM if engine == "vllm" else engine
    if "{model}" not in template or "{port}" not in template:
        raise MoepruneError(f"the engine must be 'vllm' or a command template with {{model}} and {{port}}, "
                            f"got {engine!r}")
    try:
        words = shlex.split(template)
    except ValueError as e:
        raise MoepruneError(f"cannot read the engine command {engine!r}: {e}") from None
    values = {"model": model, "port": str(port), "name": name, "python": sys.executable}
    ext = SWAPPABLE_ARGS if swappable and engine == "vllm" else []
    return [w.format(**values) for w in words] + ext + list(extra)  # the user's arguments last: they win


def export_is_current(folder: Path, digest: str) -> bool:
    """Does `folder` hold a complete export of the pattern with this digest?"""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    source = config.get("moeprune_source") if isinstance(config, dict) else None
    return isinstance(source, dict) and source.get("pattern_digest") == digest


@dataclass
class Server:
    name: str  # the pattern it serves, "fallback", or engineN (a swappable engine)
    model: str  # the folder it serves
    port: int
    command: list[str]
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@dataclass
class Deployment:
    """What `moeprune deploy` runs. `patterns`: the stored patterns to serve (default: all)."""

    store: str
    model: str
    exports: str
    engine: str = "vllm"
    engine_args: list[str] = field(default_factory=list)
    base_port: int = 8100
    patterns: list[str] | None = None
    fallback: bool = True
    startup_timeout: float = 900.0
    engines: int | None = None  # N swappable engines instead of one engine per pattern
    servers: list[Server] = field(default_factory=list)

    # -------------------------------------------------------------- exports
    def prepare(self, progress: bool = False) -> dict[str, Path]:
        """Export every pattern that has no current export; returns pattern -> export folder."""
        from ..exporter import export
        from ..store import PatternStore

        store = PatternStore(self.store)
        names = self.patterns or store.names()
        missing = [n for n in names if n not in store.names()]
        if missing:
            raise MoepruneError(f"the store {self.store} holds no pattern {missing[0]!r} "
                                f"(it holds {', '.join(store.names()) or 'none'})")
        if not names:
            raise MoepruneError(f"the store {self.store} holds no patterns to deploy")
        if self.engines is not None:
            if isinstance(self.engines, bool) or not isinstance(self.engines, int) or self.engines < 1:
                raise MoepruneError(f"--engines must be an integer >= 1, got {self.engines!r}")
            names = names[:self.engines]  # fewer patterns than engines: engines share exports
            _same_budget(names, [store.find(n) for n in names])
        out = {}
        for name in names:
            pattern = store.find(name)
            folder = Path(self.exports) / name
            if not export_is_current(folder, pattern.digest):
                print(f"moeprune deploy: exporting {name} to {folder}", file=sys.stderr, flush=True)
                export(self.model, pattern, folder, force=True, progress=progress)  # tokenizer files too
            out[name] = folder
        return out

    # -------------------------------------------------------------- engines
    def launch(self, exports: dict[str, Path]) -> None:
        """Start one engine per export (and the fallback) on consecutive loopback ports."""
        targets = list(exports.items())
        if self.engines is not None:
            folders = list(exports.values())
            targets = [(f"engine{i}", folders[i % len(folders)]) for i in range(self.engines)]
        targets += [("fallback", Path(self.model))] if self.fallback else []
        logs = Path(self.exports) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for i, (name, folder) in enumerate(targets):
            port = self.base_port + i
            swappable = self.engines is not None and name != "fallback"
            cmd = engine_command(self.engine, str(folder), port, name, self.engine_args, swappable)
            server = Server(name, str(folder), port, cmd, logs / f"{name}.log")
            env = {**os.environ, **SWAPPABLE_ENV} if swappable else None
            with open(server.log, "ab") as log:
                try:
                    # a process group of its own: Ctrl-C in the terminal reaches the front, which stops them
                    server.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                      stdin=subprocess.DEVNULL, start_new_session=True)
                except OSError as e:
                    self.stop()
                    raise MoepruneError(f"cannot start the engine for {name} ({cmd[0]}): {e.strerror or e}") from None
            self.servers.append(server)

    def wait_healthy(self) -> None:
        """Wait until every engine answers GET /v1/models; an engine that exits or never answers stops
        the deployment with its name and the end of its log."""
        deadline = time.monotonic() + self.startup_timeout
        waiting = list(self.servers)
        while waiting:
            for server in list(waiting):
                code = server.process.poll()
                if code is not None:
                    raise MoepruneError(f"the engine for {server.name} exited with status {code} while starting; "
                                        f"{_tail(server.log)}")
                if _answers(server.url):
                    waiting.remove(server)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(s.name for s in waiting)
                raise MoepruneError(f"engines for {names} did not answer within {self.startup_timeout:.0f} s; "
                                    f"{_tail(waiting[0].log)}")
            if waiting:
                time.sleep(0.5)

    def start(self, progress: bool = False) -> dict[str, str]:
        """Export, launch and wait; returns the upstream URLs (pattern -> URL; 'fallback' included).
        On any failure every engine started so far is stopped."""
        try:
            self.launch(self.prepare(progress))
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return {s.name: s.url for s in self.servers}

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM every engine (its whole process group), SIGKILL what is left after `grace` seconds."""
        live = [s for s in self.servers if s.process is not None and s.process.poll() is None]
        for s in live:
            _signal(s.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for s in live:
            try:
                s.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(s.process, signal.SIGKILL)
                s.process.wait()
        self.servers.clear()


def _same_budget(names: list[str], patterns: list) -> None:
    """Swappable engines hold the same number of experts per layer: refuse patterns that differ."""
    first = patterns[0].counts
    for name, pattern in zip(names[1:], patterns[1:], strict=True):
        counts = pattern.counts
        for layer in sorted(set(first) | set(counts)):
            if counts.get(layer) != first.get(layer):
                raise MoepruneError(f"--engines: pattern {name} keeps {counts.get(layer, 0)} experts in layer "
                                    f"{layer}, pattern {names[0]} keeps {first.get(layer, 0)}; swappable engines "
                                    f"need the same number in every layer")


def _signal(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(process.pid, sig)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/models", timeout=2) as r:  # noqa: S310 - our own loopback URL
            return r.status == 200
    except (OSError, ValueError):
        return False


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"no log at {log}"
    last = " | ".join(line.strip() for line in text[-lines:]) if text else "(empty)"
    return f"its log {log} ends: {last}"


def deploy(store: str, model: str, exports: str, engine: str = "vllm", engine_args: list[str] | None = None,
           base_port: int = 8100, patterns: list[str] | None = None, fallback: bool = True, host: str = "127.0.0.1",
           port: int = 8000, api_key: str | None = None, dtype=None, progress: bool = False,
           engines: int | None = None) -> None:
    """Start the engines and run the routing front over them until Ctrl-C; then stop everything.
    `engines`: N swappable engines multiplexing every stored pattern, instead of one per pattern."""
    from .route import route
    from .server import check_port

    check_port(port)
    check_port(base_port)
    d = Deployment(store, model, exports, engine, list(engine_args or []), base_port, patterns, fallback,
                   engines=engines)
    urls = d.start(progress)
    try:
        fallback_url = urls.pop("fallback", None)
        for s in d.servers:
            what = f" (swappable, starting on {Path(s.model).name})" if s.name.startswith("engine") and engines else ""
            print(f"moeprune deploy: {s.name}{what} served at {s.url}", file=sys.stderr, flush=True)
        if engines is not None:
            route(model, store, {}, fallback_url, host=host, port=port, api_key=api_key, dtype=dtype,
                  engines=list(urls.values()))
        else:
            route(model, store, urls, fallback_url, host=host, port=port, api_key=api_key, dtype=dtype)
    finally:
        d.stop()
