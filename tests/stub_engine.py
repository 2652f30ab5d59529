"""A stand-in for `vllm serve` in deployment tests: an OpenAI-compatible server on 127.0.0.1:PORT that
names the folder it serves in every answer. `--fail` exits at once with a message (a broken engine)."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    model, port = sys.argv[1], int(sys.argv[2])
    print(f"stub engine pid {os.getpid()} serving {model} on {port}", flush=True)
    if "--fail" in sys.argv[3:]:
        print("stub engine: CUDA out of memory (pretend)", flush=True)
        sys.exit(3)
    import uvicorn
    from fastapi import FastAPI, Request

    name = Path(model).name
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        return {"id": "c", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": f"from {name}"}, "finish_reason": "stop"}]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
