"""Layer-streamed profiling and evaluation (moeprune.stream) equal the whole-model paths bit for bit,
read each needed checkpoint byte once, spill the activations to disk under a budget, and refuse
broken checkpoints and impossible budgets in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hub_fixtures import raises_one_line
from tiny import FAMILIES, save_tiny

import moeprune
from moeprune import stream as stream_mod
from moeprune.reader import CheckpointReader
from moeprune.stream import LayerStream, parse_bytes

PROMPTS = ["hello world, this is a test", "short", "the quick brown fox jumps over the lazy dog, again and again",
           "x", "def f(x): return x*2"]  # unequal lengths: padded batches
DOCS = ["some evaluation text here for testing perplexity, " * 3, "another document, with punctuation!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    out = {}
    for family in FAMILIES:
        save_tiny(family, root / family)
        out[family] = root / family
    return out


def _same_profile(a, b) -> None:
    for k in a.stats:
        assert torch.equal(a.stats[k], b.stats[k]), k
    assert torch.equal(a.signatures, b.signatures)
    assert torch.equal(a.hidden_signatures, b.hidden_signatures)
    assert torch.equal(a.routing, b.routing)
    assert a.fingerprint == b.fingerprint and a.meta["model"] == b.meta["model"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_profile_equals_in_memory(folders, family, dtype):
    whole = moeprune.profile(folders[family], PROMPTS, stream=False, dtype=dtype, batch_size=2)
    streamed = moeprune.profile(folders[family], PROMPTS, dtype=dtype, batch_size=2)  # streaming is the default
    _same_profile(whole, streamed)
    assert streamed.meta["stream"]["bytes_read"] > 0 and "stream" not in whole.meta


def test_per_layer_masks(tmp_path):
    """GPT-OSS passes a sliding-window mask to some layers and a full one to others: each layer must
    get its own (a window shorter than the prompts makes them differ)."""
    save_tiny("gpt_oss", tmp_path / "m", sliding_window=3)
    whole = moeprune.profile(tmp_path / "m", PROMPTS, stream=False, batch_size=2)
    _same_profile(whole, moeprune.profile(tmp_path / "m", PROMPTS, batch_size=2))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_evaluation_equals_in_memory(folders, family):
    pattern = moeprune.profile(folders[family], PROMPTS).select(keep=0.5)
    for p in (None, pattern):
        whole = moeprune.evaluate(folders[family], DOCS, pattern=p, window=16, batch_size=3, stream=False)
        streamed = moeprune.evaluate(folders[family], DOCS, pattern=p, window=16, batch_size=3)
        assert streamed.tokens == whole.tokens
        assert streamed.nll == pytest.approx(whole.nll, rel=1e-6, abs=0)


def test_streamed_evaluation_bf16(folders):
    whole = moeprune.evaluate(folders["deepseek_v3"], DOCS, window=16, dtype="bfloat16", stream=False)
    assert moeprune.evaluate(folders["deepseek_v3"], DOCS, window=16, dtype="bfloat16").nll == \
        pytest.approx(whole.nll, rel=1e-6, abs=0)


def _tensor_ranges(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Checkpoint key -> (file, data offset, bytes), from the headers."""
    out = {}
    with CheckpointReader(folder) as r:
        for key in r.keys():  # noqa: SIM118
            e = r._entry(key)
            out[key] = (r.file_of(key).name, e.start, r.nbytes(key))
    return out


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe_tied", "gpt_oss"])
def test_each_needed_byte_is_read_once(folders, family):
    folder = folders[family]
    with LayerStream(folder, record_reads=True) as ls:
        ls.run([{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}])
        reads = sorted(ls.ckpt.reader.reads)
        total = ls.ckpt.reader.bytes_read
    covered: dict[str, list[tuple[int, int]]] = {}
    for file, offset, n in reads:
        covered.setdefault(file, []).append((offset, offset + n))
    for spans in covered.values():  # no byte twice
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    head = {"lm_head.weight"}  # profiling never runs the output head
    needed = {k: v for k, v in _tensor_ranges(folder).items() if k not in head}
    assert total == sum(n for _, _, n in needed.values())
    for key, (file, start, n) in needed.items():  # every needed tensor, whole
        assert any(a <= start and start + n <= b for a, b in covered[file]), key


def test_spilled_activations_give_the_same_result(folders, tmp_path):
    folder = folders["qwen3_moe"]
    whole = moeprune.profile(folder, PROMPTS, stream=False, batch_size=2)
    with LayerStream(folder) as ls:
        budget = 2 * ls.report.largest_layer + 1  # two layers and no room for the activations
    spilled = moeprune.profile(folder, PROMPTS, batch_size=2, memory_budget=budget)
    assert spilled.meta["stream"]["spilled"] and spilled.meta["stream"]["prefetch"]
    _same_profile(whole, spilled)
    roomy = moeprune.profile(folder, PROMPTS, batch_size=2, memory_budget="1GB")
    assert not roomy.meta["stream"]["spilled"]
    one_layer = moeprune.profile(folder, PROMPTS, batch_size=2, memory_budget=budget // 2 + 1)
    assert not one_layer.meta["stream"]["prefetch"]  # one layer at a time: still exact
    _same_profile(whole, one_layer)
    ev_whole = moeprune.evaluate(folder, DOCS, window=16, stream=False)
    assert moeprune.evaluate(folder, DOCS, window=16, memory_budget=budget).nll == \
        pytest.approx(ev_whole.nll, rel=1e-6, abs=0)


def test_spill_file_is_a_real_file(tmp_path):
    cache = stream_mod.HiddenCache(str(tmp_path))
    a, b = torch.randn(2, 3, 4), torch.randn(1, 5, 4, dtype=torch.bfloat16)
    cache.put(0, a)
    cache.put(1, b)
    cache.put(0, a * 2)  # a layer's output takes its input's place
    assert torch.equal(cache.get(0), a * 2) and torch.equal(cache.get(1), b)
    assert cache.spilled and not list(tmp_path.iterdir())  # unlinked at once: nothing left behind
    cache.close()


def test_budget_too_small_for_one_layer(folders):
    folder = folders["mixtral"]
    msg = raises_one_line(lambda: moeprune.profile(folder, PROMPTS, memory_budget=1000),
                          "smaller than one decoder layer")
    assert "layer" in msg and "two layers" in msg
    for bad in ("lots", "-5GB", 0, True):
        raises_one_line(lambda bad=bad: moeprune.profile(folder, PROMPTS, memory_budget=bad), "memory budget")


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(1234) == 1234 and parse_bytes("2e3") == 2000 and parse_bytes(None) is None


def _sharded(folders, tmp_path) -> Path:
    src = folders["mixtral"]
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, max_shard_size="60KB")
    for f in src.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def test_missing_shard_refuses(folders, tmp_path):
    folder = _sharded(folders, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (folder / last).unlink()
    raises_one_line(lambda: moeprune.profile(folder, PROMPTS), last)


def test_truncated_shard_refuses(folders, tmp_path):
    folder = _sharded(folders, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    raises_one_line(lambda: moeprune.profile(folder, PROMPTS), shard.name)


def test_fingerprint_of_an_offloaded_model_comes_from_its_checkpoint(folders):
    """accelerate's disk offload leaves router weights on the meta device: the fingerprint is then
    read from the model's checkpoint folder, and a model without one is refused in one line."""
    from moeprune.fingerprint import model_fingerprint
    from moeprune.models import load_model

    model = load_model(folders["deepseek_v3"])[0]
    want = model_fingerprint(model)
    adapter = moeprune.get_adapter(model)
    router = adapter.router(adapter.blocks(model)[0][1])
    router.weight = torch.nn.Parameter(router.weight.to("meta"), requires_grad=False)
    assert model_fingerprint(model) == want
    model.config._name_or_path = ""
    raises_one_line(lambda: model_fingerprint(model), "offloaded")


def test_kernel_caches_bounded_unless_the_user_chose(monkeypatch):
    from moeprune._io import bound_kernel_caches

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    bound_kernel_caches(0)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"
    assert os.environ["LRU_CACHE_CAPACITY"] == "1"  # ideep's cache cannot be empty
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    bound_kernel_caches(64)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64" and os.environ["LRU_CACHE_CAPACITY"] == "7"


# ---------------------------------------------------------------------------------------------- data parallel
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_moe_tied"])
def test_data_parallel_profile_equals_one_device(folders, family):
    """Two devices (CPU threads here; GPUs in benchmarks/gpu_check.py), each running every other
    batch on its own copy of the layer: per-prompt signatures and the routing record are exact, the
    statistics float64 sums of the two devices' partial sums."""
    one = moeprune.profile(folders[family], PROMPTS, batch_size=2)
    two = moeprune.profile(folders[family], PROMPTS, batch_size=2, device="cpu,cpu")
    for k in one.stats:
        assert torch.allclose(one.stats[k], two.stats[k], rtol=1e-12, atol=0), k
        assert not torch.equal(two.stats[k], torch.zeros_like(two.stats[k]))
    assert torch.equal(one.signatures, two.signatures)
    assert torch.equal(one.hidden_signatures, two.hidden_signatures)
    assert torch.equal(one.routing, two.routing)


def test_data_parallel_routing_record_keeps_the_first_tokens_in_batch_order(folders):
    one = moeprune.profile(folders["mixtral"], PROMPTS, batch_size=1, routing_tokens=70)
    three = moeprune.profile(folders["mixtral"], PROMPTS, batch_size=1, routing_tokens=70, device=["cpu"] * 3)
    assert one.routing.shape[1] == 70 and torch.equal(one.routing, three.routing)  # spans two batches


def test_data_parallel_evaluation_equals_one_device(folders):
    folder = folders["deepseek_v3"]
    pattern = moeprune.profile(folder, PROMPTS).select(keep=0.5)
    for p in (None, pattern):
        one = moeprune.evaluate(folder, DOCS, pattern=p, window=16, batch_size=1)
        two = moeprune.evaluate(folder, DOCS, pattern=p, window=16, batch_size=1, device="cpu,cpu")
        assert two.tokens == one.tokens
        assert two.nll == pytest.approx(one.nll, rel=1e-9, abs=0)


def test_device_lists_are_checked():
    from moeprune.stream import parse_devices

    assert parse_devices("cuda:0, cuda:1") == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert parse_devices("cpu") == [torch.device("cpu")]
    raises_one_line(lambda: parse_devices("cuda:0,cuda:0"), "listed twice")
    raises_one_line(lambda: parse_devices("gpu7"), "not a device")
    raises_one_line(lambda: parse_devices([]), "no device")


def test_data_parallel_splits_the_batches_between_the_devices(folders):
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with LayerStream(folders["qwen3_moe"], device="cpu,cpu") as ls:
        assert ls.share(3) == [[0, 2], [1]] and len(ls.models) == 2
        calls = [0, 0]
        for k, m in enumerate(ls.models):
            layer = ls.adapter.decoder_layers(m)[1]
            layer.register_forward_pre_hook(lambda mod, args, k=k: calls.__setitem__(k, calls[k] + 1))
        ls.run([batch] * 3)
    assert calls == [2, 1]


def test_several_devices_need_the_streamed_path(folders):
    raises_one_line(lambda: moeprune.profile(folders["mixtral"], PROMPTS, stream=False, device="cpu,cpu"),
                    "streamed run only")
    raises_one_line(lambda: moeprune.evaluate(folders["mixtral"], DOCS, stream=False, device="cpu,cpu"),
                    "streamed run only")


def test_data_parallel_with_spilled_activations(folders):
    folder = folders["qwen3_moe"]
    one = moeprune.profile(folder, PROMPTS, batch_size=1)
    with LayerStream(folder) as ls:
        budget = 2 * ls.report.largest_layer + 1  # two layers and no room for the activations
    two = moeprune.profile(folder, PROMPTS, batch_size=1, memory_budget=budget, device="cpu,cpu")
    assert two.meta["stream"]["spilled"]
    assert torch.equal(one.signatures, two.signatures) and torch.equal(one.routing, two.routing)
    for k in one.stats:
        assert torch.allclose(one.stats[k], two.stats[k], rtol=1e-12, atol=0), k
