"""A stand-in for `vllm serve` in deployment and routing tests: an OpenAI-compatible server that names
what it serves in every answer, with the control routes of vLLM's dev mode (/pause, /resume,
/reset_prefix_cache, /collective_rpc running moeprune_swap / moeprune_resident) like an engine with
the ExpertSwap worker extension. In-process: `StubEngine(...).app`. As a process:
`python stub_engine.py MODEL PORT [--fail] [--store STORE]` on 127.0.0.1:PORT, resident pattern read
from MODEL's export config (its kept experts from STORE when the config does not list them); the
control routes exist only with VLLM_SERVER_DEV_MODE=1, as in vLLM. No `from __future__ import
annotations`: FastAPI reads the routes' annotations at runtime."""

import asyncio
import json
import os
import sys
from pathlib import Path


class StubEngine:
    """`resident`: {"name", "digest", "kept"} or None (an unknown pattern). Answers name the resident
    pattern ("from NAME"). `hold` (an asyncio.Event) keeps completions open until set; `gate` keeps a
    swap open until set (`swap_started` is set when one begins). Requests that arrive while paused,
    and swaps run unpaused or with requests in flight, are recorded in `violations`."""

    def __init__(self, served_id: str, resident: dict | None = None, workers: int = 2, dev_mode: bool = True):
        self.served_id, self.workers = served_id, workers
        self.resident = resident or {"name": None, "digest": "sha256:unknown", "kept": {}}
        self.paused, self.in_flight = False, 0
        self.seen: list[tuple[str, str | None]] = []  # (path, resident name when it was answered)
        self.calls: list[str] = []  # control calls, in order
        self.violations: list[str] = []
        self.swaps: list[dict] = []
        self.hold: asyncio.Event | None = None
        self.gate: asyncio.Event | None = None
        self.swap_started = asyncio.Event()
        self.fail_swap: str | None = None
        self.prefix_failures = 0
        self.app = self._build(dev_mode)

    def _build(self, dev_mode: bool):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse

        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.served_id, "object": "model"}]}

        async def complete(request: Request, path: str):
            body = await request.json()
            if self.paused:
                self.violations.append(f"{path} while paused")
                return JSONResponse({"error": {"message": "paused"}}, status_code=503)
            self.in_flight += 1
            try:
                if self.hold is not None:
                    await self.hold.wait()
                self.seen.append((path, self.resident["name"]))
                return {"id": "c", "model": body["model"], "text": f"from {self.resident['name']}",
                        "choices": [{"index": 0, "finish_reason": "stop", "text": f"from {self.resident['name']}",
                                     "message": {"role": "assistant", "content": f"from {self.resident['name']}"}}]}
            finally:
                self.in_flight -= 1

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await complete(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await complete(request, "completions")

        if not dev_mode:
            return app

        @app.post("/pause")
        async def pause(mode: str = "abort"):
            self.calls.append(f"pause:{mode}")
            self.paused = True
            return {"status": "paused"}

        @app.post("/resume")
        async def resume():
            self.calls.append("resume")
            self.paused = False
            return {"status": "resumed"}

        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache():
            self.calls.append("reset_prefix_cache")
            if self.prefix_failures:
                self.prefix_failures -= 1
                return {"success": False}
            return {"success": True}

        @app.post("/collective_rpc")
        async def collective_rpc(request: Request):
            body = await request.json()
            method = body.get("method")
            self.calls.append(method)
            if method == "moeprune_resident":
                return {"results": [dict(self.resident) for _ in range(self.workers)]}
            if method != "moeprune_swap":
                return JSONResponse({"error": f"no method {method}"}, status_code=400)
            arg = json.loads(body["args"][0])
            if not self.paused or self.in_flight:
                self.violations.append(f"swap with paused={self.paused} in_flight={self.in_flight}")
            self.swap_started.set()
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_swap:  # as the extension: failed half way, it no longer knows what it holds
                self.resident = {"name": None, "digest": None, "kept": None}
                return {"results": [{"error": self.fail_swap} for _ in range(self.workers)]}
            from moeprune.pattern import Pattern

            pattern = Pattern.from_dict(arg["pattern"])
            self.swaps.append({"name": arg["name"], "source": arg["source"]})
            self.resident = {"name": arg["name"], "digest": pattern.digest,
                             "kept": {str(k): v for k, v in pattern.kept.items()}}
            return {"results": [{"name": arg["name"], "digest": pattern.digest, "bytes_read": 1000, "seconds": 0.01,
                                 "experts_written": pattern.n_kept} for _ in range(self.workers)]}

        return app


def resident_of(folder: Path, store: str | None = None) -> dict | None:
    """The pattern an export was made from (its config's moeprune_source), as moeprune_resident tells it."""
    try:
        source = json.loads((folder / "config.json").read_text()).get("moeprune_source") or {}
    except (OSError, ValueError):
        return None
    kept = source.get("kept")
    if kept is None and store and "pattern_digest" in source:
        from moeprune.store import PatternStore

        s = PatternStore(store)
        found = [p for p in map(s.find, s.names()) if p is not None and p.digest == source["pattern_digest"]]
        kept = {str(k): v for k, v in found[0].kept.items()} if found else None
    if kept is None:
        return None
    return {"name": folder.name, "digest": source["pattern_digest"], "kept": kept}


if __name__ == "__main__":
    model, port = sys.argv[1], int(sys.argv[2])
    print(f"stub engine pid {os.getpid()} serving {model} on {port}", flush=True)
    if "--fail" in sys.argv[3:]:
        print("stub engine: CUDA out of memory (pretend)", flush=True)
        sys.exit(3)
    import uvicorn

    folder = Path(model)
    args = sys.argv[3:]
    store = args[args.index("--store") + 1] if "--store" in args else None
    engine = StubEngine(folder.name, resident_of(folder, store) or {"name": folder.name, "digest": None, "kept": {}},
                        dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE") == "1")
    print(f"stub engine: extra arguments {sys.argv[3:]}", flush=True)
    uvicorn.run(engine.app, host="127.0.0.1", port=port, log_level="warning")
