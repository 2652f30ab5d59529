"""The real server process (uvicorn in a subprocess), only where a process is the point: a real socket,
Ctrl-C draining an in-flight stream, and start-up refusals of the command line. Everything else is
tested in-process in test_server.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import pytest

from moeprune.demo import DEMO_MODEL

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(store_path, port, *extra):
    env = dict(os.environ, MOEPRUNE_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "serve", str(DEMO_MODEL), "--store",
                             str(store_path), "--port", str(port), "--expert-budget", "20", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a loaded machine takes long to import torch; a dead server says so at once
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
    proc.kill()
    raise RuntimeError("server did not start")


def test_real_socket_and_ctrl_c_drains_a_stream_in_flight(demo_store_path):
    proc, url = _start(demo_store_path, _free_port())
    try:
        h = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/models", headers=h).json()["data"][0]["id"] == "demo_model"
        body = {"model": "demo_model:python", "prompt": "def f(x):", "max_tokens": 40, "temperature": 0,
                "stream": True}
        chunks = []
        with httpx.stream("POST", f"{url}/v1/completions", headers=h, json=body, timeout=300) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    chunks.append(line)
                    break
            proc.send_signal(signal.SIGINT)  # the stream is certainly in flight: its first chunk has arrived
            chunks += [line for line in lines if line.startswith("data:")]
        assert chunks[-1] == "data: [DONE]"
        last = json.loads(chunks[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("extra,message", [
    (["--port", "70000"], "port"), (["--max-queue", "0"], "max-queue"), (["--expert-budget", "8"], "smaller"),
])
def test_start_up_refusals_are_one_line(demo_store_path, extra, message, capsys):
    from moeprune.cli import main

    assert main(["serve", str(DEMO_MODEL), "--store", str(demo_store_path), *extra]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_warns_on_a_public_host_without_a_key(demo_store_path, monkeypatch, capsys):
    import uvicorn

    from moeprune.serve.server import serve

    monkeypatch.delenv("MOEPRUNE_API_KEY", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    serve(str(DEMO_MODEL), str(demo_store_path), host="0.0.0.0", expert_budget=20)
    assert "without an API key" in capsys.readouterr().err
    serve(str(DEMO_MODEL), str(demo_store_path), host="127.0.0.1", expert_budget=20)
    assert "without an API key" not in capsys.readouterr().err
