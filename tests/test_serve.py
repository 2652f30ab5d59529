"""The real server (uvicorn in a subprocess) over the demo model and a store of its domains,
driven with the official `openai` client."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # what the openai client itself uses
import openai
import pytest
import torch

from moeprune.demo import DEMO_DATA, DEMO_MODEL

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="no bundled demo model")
KEY = "test-key"
BUDGET = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(store_path, port, *extra):
    env = dict(os.environ, MOEPRUNE_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "serve", str(DEMO_MODEL), "--store",
                             str(store_path), "--port", str(port), "--expert-budget", str(BUDGET), *extra],
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


def _wait_idle(url: str) -> None:
    deadline = time.monotonic() + 300
    while httpx.get(f"{url}/health", timeout=60).json()["queue"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{url}/health", timeout=60).json()["queue"] == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeprune
    from moeprune.prompts import read_prompts
    from moeprune.store import PatternStore

    root = tmp_path_factory.mktemp("serve")
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    store = PatternStore(root / "store")
    for d in ("python", "legal", "bible"):
        prof = moeprune.profile(model, read_prompts(DEMO_DATA / f"{d}.calib.jsonl"), tokenizer=tok, domain=d,
                                max_length=256)
        store.add(d, prof, prof.select(keep=0.5), rebuild=False)
    store.rebuild_index()
    proc, url = _start(root / "store", _free_port(), "--max-queue", "2", "--max-batch", "4")
    yield {"url": url, "store": store, "proc": proc, "store_path": root / "store"}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stdout.read()[-2000:]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0)


def _pattern_of(raw) -> str:
    return raw.headers["x-moeprune-pattern"]


def test_retrieval_per_request(client):
    raw = client.completions.with_raw_response.create(model="demo_model", prompt="import os\ndef main(argv):\n",
                                                      max_tokens=8, temperature=0)
    c = raw.parse()
    assert _pattern_of(raw) == "python" and c.moeprune["pattern"] == "python" and not c.moeprune["fell_back"]
    assert c.usage.completion_tokens <= 8 and c.choices[0].finish_reason in ("length", "stop")
    raw = client.chat.completions.with_raw_response.create(
        model="demo_model", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "And the LORD spake unto Moses, saying, Speak unto the children"}])
    assert _pattern_of(raw) == "bible" and raw.parse().choices[0].message.role == "assistant"


def test_streaming_matches_non_streaming(client):
    kw = dict(model="demo_model", prompt="Permission is hereby granted, free of charge, to any person", max_tokens=16,
              temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    parts = list(client.completions.create(stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts) == whole
    assert parts[-1].choices[0].finish_reason in ("length", "stop") and parts[0].moeprune["pattern"] == "legal"
    chat = list(client.chat.completions.create(model="demo_model", stream=True, max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": "def parse(argv):"}]))
    assert chat and chat[-1].choices[0].finish_reason is not None


def test_pinned_pattern_equals_load_slim(client, server):
    from transformers import AutoTokenizer

    import moeprune

    prompt = "And God said, Let there be light"
    raw = client.completions.with_raw_response.create(model="demo_model:legal", prompt=prompt, max_tokens=12,
                                                      temperature=0)
    assert _pattern_of(raw) == "legal"
    got = raw.parse().choices[0].text
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    slim = moeprune.load_slim(DEMO_MODEL, server["store"].get("legal").pattern)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = slim.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    new = out.tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    assert got == tok.decode(new, skip_special_tokens=True)


def test_models_health_metrics(server):
    h = {"Authorization": f"Bearer {KEY}"}
    ids = [m["id"] for m in httpx.get(f"{server['url']}/v1/models", headers=h).json()["data"]]
    assert {"demo_model", "demo_model:python", "demo_model:legal", "demo_model:bible"} <= set(ids)
    assert httpx.get(f"{server['url']}/health").json()["status"] == "ok"  # no key needed
    text = httpx.get(f"{server['url']}/metrics", headers=h).text
    for name in ("moeprune_requests_total", "moeprune_tokens_total", "moeprune_retrievals_total",
                 "moeprune_expert_loads", "moeprune_expert_evictions", "moeprune_expert_bytes_read",
                 "moeprune_request_latency_seconds_bucket"):
        assert name in text


def test_auth(server):
    url = f"{server['url']}/v1/completions"
    body = {"prompt": "hello", "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server['url']}/v1", api_key="bad", max_retries=0).models.list()


def test_bad_requests(server, client):
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    url = f"{server['url']}/v1/completions"
    r = httpx.post(url, content=b"{not json", headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": "x " * 5000, "max_tokens": 2}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url, json={"prompt": "x", "max_tokens": 100000}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="demo_model:nosuch", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo_model", prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo_model", messages=[], max_tokens=2)
    assert client.completions.create(model="demo_model", prompt="still serving", max_tokens=2).usage


def test_queue_full_then_recovers(server, client):
    statuses = []

    def call():
        r = httpx.post(f"{server['url']}/v1/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                       json={"prompt": "def f(x):", "max_tokens": 64, "temperature": 0.8, "seed": len(statuses)})
        statuses.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    # generation runs off the event loop: /health answers while requests are still in the queue
    busy = []
    while any(t.is_alive() for t in threads) and not busy:
        busy = [q for q in [httpx.get(f"{server['url']}/health", timeout=60).json()["queue"]] if q > 0]
    for t in threads:
        t.join()
    assert busy, "/health never answered while requests were queued or running"
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    assert client.completions.create(model="demo_model", prompt="after the storm", max_tokens=2).usage


def test_client_disconnect_mid_stream(server, client):
    h = {"Authorization": f"Bearer {KEY}"}
    before = _metric(server, "moeprune_generations_stopped_early")
    with httpx.stream("POST", f"{server['url']}/v1/completions", headers=h, timeout=120,
                      json={"prompt": "def f(x):", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    assert client.completions.create(model="demo_model", prompt="next", max_tokens=2).usage
    _wait_idle(server["url"])
    # the generation stopped because the client left: before its 400 tokens and before end-of-text
    assert _metric(server, "moeprune_generations_stopped_early") == before + 1


def _metric(server, name):
    text = httpx.get(f"{server['url']}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_switch_reads_only_missing_experts(server, client):
    from moeprune.reader import CheckpointReader

    with CheckpointReader(DEMO_MODEL) as r:
        per_expert = sum(r.nbytes(k) for k in r.keys() if ".experts.0." in k and "layers.0." in k)  # noqa: SIM118
    store = server["store"]

    def pin(name):
        before = (_metric(server, "moeprune_expert_bytes_read"), _metric(server, "moeprune_expert_loads"))
        client.completions.create(model=f"demo_model:{name}", prompt="x", max_tokens=1)
        return (_metric(server, "moeprune_expert_bytes_read") - before[0],
                _metric(server, "moeprune_expert_loads") - before[1])

    pats = {n: store.get(n).pattern for n in ("python", "legal", "bible")}
    pin("python")
    assert pin("python") == (0, 0)  # all resident: nothing read
    previous, total = "python", 0
    for name in ("legal", "bible", "python", "legal"):
        read, loads = pin(name)
        differing = sum(len(set(pats[name].kept[layer]) - set(pats[previous].kept[layer])) for layer in pats[name].kept)
        assert read == loads * per_expert and loads <= differing  # only experts the pool lacked were read
        assert pin(name) == (0, 0)
        previous, total = name, total + loads
    union = max(len(set().union(*(p.kept[layer] for p in pats.values()))) for layer in pats["python"].kept)
    assert union <= BUDGET or total > 0  # three patterns that do not fit together force real loads
    assert _metric(server, "moeprune_resident_experts") <= BUDGET * len(pats["python"].kept)


def test_chat_that_drifts_gets_other_experts(client):
    code = "import os\nimport sys\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n        print(name)\n"
    verse = ("And it came to pass, when men began to multiply on the face of the earth, and daughters were born "
             "unto them, That the sons of God saw the daughters of men that they were fair; and they took them "
             "wives of all which they chose.")
    first = client.chat.completions.with_raw_response.create(
        model="demo_model", max_tokens=4, temperature=0, messages=[{"role": "user", "content": code}])
    assert _pattern_of(first) == "python"
    later = client.chat.completions.with_raw_response.create(
        model="demo_model", max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": code}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": verse}])
    assert _pattern_of(later) == "bible"  # retrieval follows the latest user turn


def test_ctrl_c_drains_in_flight_requests(server):
    proc, url = _start(server["store_path"], _free_port())
    result = {}

    def call():
        r = httpx.post(f"{url}/v1/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                       json={"prompt": "def f(x):", "max_tokens": 200, "temperature": 0})
        result["status"], result["tokens"] = r.status_code, r.json()["usage"]["completion_tokens"]

    t = threading.Thread(target=call)
    t.start()
    for _ in range(200):  # wait until the request is in flight
        if httpx.get(f"{url}/health").json()["queue"] > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t.join(timeout=120)
    assert proc.wait(timeout=60) == 0
    assert result["status"] == 200 and result["tokens"] > 0


def test_stop_and_seed(client):
    kw = dict(model="demo_model:python", prompt="import os\nimport sys\n", max_tokens=40)
    plain = client.completions.create(temperature=0, **kw).choices[0].text
    cut = client.completions.create(temperature=0, stop=["\n"], **kw).choices[0]
    assert "\n" not in cut.text and plain.startswith(cut.text) and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(temperature=0, stop=["\n"], stream=True,
                                                                              **kw))
    assert streamed == cut.text
    a = client.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    b = client.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    assert a == b


def test_concurrent_streams_each_get_their_own_tokens(client):
    prompts = ["import os\n", "class Foo:\n"]  # the module's server queues at most 2
    alone = [client.completions.create(model="demo_model:python", prompt=p, max_tokens=10, temperature=0)
             .choices[0].text for p in prompts]
    results = {}

    def stream(i):
        parts = list(client.completions.create(model="demo_model:python", prompt=prompts[i], max_tokens=10,
                                               temperature=0, stream=True))
        results[i] = ("".join(c.choices[0].text for c in parts), parts[-1].choices[0].finish_reason)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1] and all(r[1] in ("stop", "length") for r in results.values())
    # rows of a shared batch never mix: each stream continues its own prompt like its lone run
    assert all(results[i][0][:8] == alone[i][:8] for i in range(2)), (results, alone)
