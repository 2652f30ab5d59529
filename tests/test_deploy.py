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
from moeprune.serve.deploy import SWAPPABLE_ARGS, Deployment, engine_command, export_is_current

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


def ask(store, cfg, models: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """Through a front with `cfg` (in process): (upstream, reply) of a chat request to each model id, and
    /health after them."""
    from moeprune.models import load_tokenizer
    from moeprune.serve.route import Router, create_route_app
    from moeprune.store import PatternStore
    from moeprune.store.signature import load_signature_model

    router = Router(PatternStore(store), load_signature_model(DEMO_MODEL, dtype=torch.float32),
                    load_tokenizer(DEMO_MODEL), cfg)
    app = create_route_app(router, cfg)

    async def main():
        await app.app.state.front.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f") as h:
                out = []
                for model in models:
                    r = await h.post("/v1/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": "hi"}]})
                    assert r.status_code == 200, r.text
                    out.append((r.json()["moeprune"]["upstream"], r.json()["choices"][0]["message"]["content"]))
                return out, (await h.get("/health")).json()
        finally:
            await app.app.state.front.stop()

    return asyncio.run(main())


def test_engine_command():
    assert engine_command("vllm", "/m/python", 8101, "python", ["--tensor-parallel-size", "2"]) == [
        "vllm", "serve", "/m/python", "--host", "127.0.0.1", "--port", "8101", "--served-model-name", "python",
        "--tensor-parallel-size", "2"]
    assert engine_command("{python} s.py {model} {port}", "/m", 1, "x", [])[1:] == ["s.py", "/m", "1"]
    with pytest.raises(MoepruneError, match="{model} and {port}"):
        engine_command("sglang", "/m", 1, "x", [])
    swappable = engine_command("vllm", "/m/python", 8101, "engine0", ["--enforce-eager"], swappable=True)
    assert swappable[-3:] == ["--worker-extension-cls", "moeprune.serve.vllm_ext.ExpertSwap", "--enforce-eager"]
    assert SWAPPABLE_ARGS[0] not in engine_command("{python} s.py {model} {port}", "/m", 1, "x", [], swappable=True)


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
    from moeprune.serve.route import RouteConfig

    d = Deployment(store, str(DEMO_MODEL), str(tmp_path / "exports"), engine=ENGINE,
                   patterns=["python", "legal"], base_port=ports(3), startup_timeout=120)
    urls = d.start()
    procs = [s.process for s in d.servers]
    try:
        fallback = urls.pop("fallback")
        assert sorted(urls) == ["legal", "python"]
        assert all(u.startswith("http://127.0.0.1:") for u in [*urls.values(), fallback])
        cfg = RouteConfig(model_name="demo_model", upstreams=urls, fallback=fallback)
        replies, _ = ask(store, cfg, ["demo_model:python", "demo_model:legal", "demo_model:full"])
        answers = {model: text for model, (_, text) in zip(["demo_model:python", "demo_model:legal",
                                                             "demo_model:full"], replies, strict=True)}
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


def test_swappable_engines_need_the_same_budget(store, tmp_path):
    from moeprune.store import PatternStore

    s = PatternStore(store)
    prof = s.profile("legal")
    s.add("narrow", prof, prof.select(keep=0.25))
    d = Deployment(store, str(DEMO_MODEL), str(tmp_path / "exports"), patterns=["python", "narrow"], engines=2)
    with pytest.raises(MoepruneError, match=r"pattern narrow keeps \d+ experts in layer \d+, pattern python") as e:
        d.prepare()
    assert "\n" not in str(e.value)
    with pytest.raises(MoepruneError, match="--engines must be an integer >= 1"):
        Deployment(store, str(DEMO_MODEL), str(tmp_path / "exports"), engines=0).prepare()


def test_swappable_engines_start_in_dev_mode_and_swap(store, tmp_path):
    """Two stub engines started like vLLM with the worker extension (the env var turns their control
    routes on); the front serves a third pattern by swapping one of them, the fallback as before."""
    from moeprune.serve.route import RouteConfig

    d = Deployment(store, str(DEMO_MODEL), str(tmp_path / "exports"), engine=ENGINE, patterns=["python", "legal"],
                   base_port=ports(3), startup_timeout=120, engines=2, engine_args=["--store", store])
    urls = d.start()
    try:
        assert sorted(urls) == ["engine0", "engine1", "fallback"]
        assert [Path(s.model).name for s in d.servers[:2]] == ["python", "legal"]
        fallback = urls.pop("fallback")
        cfg = RouteConfig(model_name="demo_model", upstreams={}, fallback=fallback, engines=list(urls.values()),
                          source=str(DEMO_MODEL), queue_timeout=60)
        answers, health = ask(store, cfg, ["demo_model:python", "demo_model:bible", "demo_model:legal",
                                           "demo_model:full"])
    finally:
        d.stop()
    # bible: the least recently used idle engine (engine1) is swapped to it; legal then moves to engine0
    assert answers == [("engine0", "from python"), ("engine1", "from bible"), ("engine0", "from legal"),
                       ("fallback", f"from {DEMO_MODEL.name}")]
    assert {n: u["resident"] for n, u in health["upstreams"].items() if n.startswith("engine")} == {
        "engine0": "legal", "engine1": "bible"}


def test_cli_pool_flags(store, tmp_path, capsys):
    from moeprune.cli import build_parser, main

    args = build_parser().parse_args(["route", str(DEMO_MODEL), "--store", store, "--engine", "http://a/v1",
                                      "--engine", "http://b/v1"])
    assert args.engine == ["http://a/v1", "http://b/v1"] and args.max_queue == 256
    assert main(["route", str(DEMO_MODEL), "--store", store, "--engine", "http://a:1/"]) == 2
    assert "engine0" in capsys.readouterr().err
    assert main(["deploy", store, str(DEMO_MODEL), "--exports", str(tmp_path / "e"), "--engines", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--engines must be an integer >= 1" in err and err.count("\n") == 1
