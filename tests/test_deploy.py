"""`moeprune deploy` with a stand-in engine (tests/stub_engine.py) instead of vLLM: exports are made
once and re-made only for a changed pattern, every engine is started on loopback and waited for, the
front routes to them, a failing engine stops the deployment with its log, and Ctrl-C stops them all."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import torch

from moeprune import MoepruneError
from moeprune.demo import DEMO_MODEL
from moeprune.serve.deploy import Deployment, engine_command, export_is_current

STUB = str(Path(__file__).with_name("stub_engine.py"))
ENGINE = "{python} " + STUB + " {model} {port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports(n: int) -> int:
    """A base port with n free ports after it (checked, not guaranteed: retried by the caller)."""
    for _ in range(50):
        base = free_port()
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


@pytest.fixture
def store(demo_store_path, tmp_path):
    shutil.copytree(demo_store_path, tmp_path / "store")
    return str(tmp_path / "store")


def test_engine_command():
    assert engine_command("vllm", "/m/python", 8101, "python", ["--tensor-parallel-size", "2"]) == [
        "vllm", "serve", "/m/python", "--host", "127.0.0.1", "--port", "8101", "--served-model-name", "python",
        "--tensor-parallel-size", "2"]
    assert engine_command("{python} s.py {model} {port}", "/m", 1, "x", [])[1:] == ["s.py", "/m", "1"]
    with pytest.raises(MoepruneError, match="{model} and {port}"):
        engine_command("sglang", "/m", 1, "x", [])


def test_exports_are_made_once_and_remade_when_the_pattern_changes(store, tmp_path):
    from moeprune.store import PatternStore

    d = Deployment(store, str(DEMO_MODEL), str(tmp_path / "exports"), patterns=["python", "legal"])
    out = d.prepare()
    assert sorted(out) == ["legal", "python"] and (out["python"] / "tokenizer.json").is_file()
    stamp = {n: (f / "config.json").stat().st_mtime_ns for n, f in out.items()}
    d.prepare()
    assert {n: (f / "config.json").stat().st_mtime_ns for n, f in out.items()} == stamp  # current: kept
    s = PatternStore(store)
    prof = s.profile("python")
    s.remove("python")
    s.add("python", prof, prof.select(keep=0.25))
    d.prepare()
    assert (out["python"] / "config.json").stat().st_mtime_ns != stamp["python"]  # changed: re-exported
    assert (out["legal"] / "config.json").stat().st_mtime_ns == stamp["legal"]
    assert export_is_current(out["python"], s.find("python").digest)
    with pytest.raises(MoepruneError, match="no pattern 'nope'"):
        Deployment(store, str(DEMO_MODEL), str(tmp_path / "e2"), patterns=["nope"]).prepare()


def test_engines_start_route_and_stop(store, tmp_path):
    from moeprune.models import load_tokenizer
    from moeprune.serve.route import RouteConfig, Router, create_route_app
    from moeprune.store import PatternStore
    from moeprune.store.signature import load_signature_model

    d = Deployment(store, str(DEMO_MODEL), str(tmp_path / "exports"), engine=ENGINE,
                   patterns=["python", "legal"], base_port=ports(3), startup_timeout=120)
    urls = d.start()
    procs = [s.process for s in d.servers]
    try:
        fallback = urls.pop("fallback")
        assert sorted(urls) == ["legal", "python"]
        assert all(u.startswith("http://127.0.0.1:") for u in [*urls.values(), fallback])
        cfg = RouteConfig(model_name="demo_model", upstreams=urls, fallback=fallback)
        router = Router(PatternStore(store), load_signature_model(DEMO_MODEL, dtype=torch.float32),
                        load_tokenizer(DEMO_MODEL), cfg)
        app = create_route_app(router, cfg)

        async def main():
            await app.app.state.front.start()
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f") as h:
                    out = {}
                    for model in ("demo_model:python", "demo_model:legal", "demo_model:full"):
                        r = await h.post("/v1/chat/completions", json={
                            "model": model, "messages": [{"role": "user", "content": "hi"}]})
                        out[model] = r.json()["choices"][0]["message"]["content"]
                    return out
            finally:
                await app.app.state.front.stop()
        answers = asyncio.run(main())
    finally:
        d.stop()
    assert answers == {"demo_model:python": "from python", "demo_model:legal": "from legal",
                       "demo_model:full": f"from {DEMO_MODEL.name}"}
    assert all(p.poll() is not None for p in procs)


def test_a_failing_engine_stops_the_deployment(store, tmp_path):
    d = Deployment(store, str(DEMO_MODEL), str(tmp_path / "exports"), engine=ENGINE, patterns=["python"],
                   engine_args=["--fail"], base_port=ports(2), startup_timeout=120)
    with pytest.raises(MoepruneError, match="exited with status 3.*out of memory") as e:
        d.start()
    assert "\n" not in str(e.value)
    assert not d.servers  # everything started was stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_every_engine(store, tmp_path):
    """The whole command in a process of its own (the process is the point): SIGINT to the front
    brings every engine down."""
    exports, base, port = tmp_path / "exports", ports(3), free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "moeprune.cli", "deploy", store, str(DEMO_MODEL), "--exports", str(exports),
           "--engine", ENGINE, "--patterns", "python,legal", "--base-port", str(base), "--port", str(port), "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the front answers once every engine did
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        pids = []
        for log in (exports / "logs").glob("*.log"):
            first = log.read_text().splitlines()[0]
            pids.append(int(first.split()[3]))
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
