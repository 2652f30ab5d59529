"""load_slim: equals the masked full model for every family, reads only kept experts' bytes."""

import json
import random
import re

import pytest
import torch
from tiny import FAMILIES, char_tokenizer, save_tiny
from transformers import AutoModelForCausalLM

import moeprune
from moeprune import MoepruneError, Pattern, get_adapter, load_slim
from moeprune.fingerprint import model_fingerprint
from moeprune.hooks import keep_mask
from moeprune.reader import CheckpointReader

PROMPTS = ["def f(x):\n    return x * 2", "And God said, Let there be light", "#include <stdlib.h>"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> (folder, full model); every other family saved sharded."""
    out = {}
    for i, model_type in enumerate(FAMILIES):
        folder = tmp_path_factory.mktemp(model_type)
        model = save_tiny(model_type, folder)
        if i % 2:
            model.save_pretrained(folder, max_shard_size="60KB")
            (folder / "model.safetensors").unlink(missing_ok=True)
        out[model_type] = (folder, model)
    return out


def _compare(full, slim, pattern):
    adapter = get_adapter(full)
    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), keep_mask(full, adapter, pattern.keep_masks()):
        want = full(ids).logits
        want_gen = full.generate(ids[:1], max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        got = slim(ids).logits
        got_gen = slim.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert (want - got).abs().max().item() <= 1e-5
    assert torch.equal(want_gen, got_gen)


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("strategy", ["uniform", "global"])
def test_slim_equals_masked_full(model_type, strategy, checkpoints, tok):
    folder, full = checkpoints[model_type]
    prof = moeprune.profile(full, PROMPTS, tokenizer=tok)
    pattern = prof.select(keep=0.5, strategy=strategy)
    slim = load_slim(folder, pattern)
    assert type(slim) is type(full)
    adapter = get_adapter(full)
    for layer, block in adapter.blocks(slim):
        assert adapter.experts(block).gate_up_proj.shape[0] == pattern.counts[layer]
    if pattern.is_uniform:
        assert adapter.num_experts(slim.config) == pattern.counts[adapter.moe_layers(full.config)[0]]
    _compare(full, slim, pattern)


def _pattern(full, kept: dict) -> Pattern:
    return Pattern(kept, {"num_experts": 8, "fingerprint": model_fingerprint(full)})


def _expected_reads(folder, kept: dict[int, list[int]]) -> list[tuple[str, int, int]]:
    """Every read load_slim should make: each tensor whole, except experts: only the kept ones (per-expert
    keys), or only the kept rows of fused expert tensors (one read per run of consecutive rows)."""
    want = []
    with CheckpointReader(folder) as reader:
        for key in reader.keys():  # noqa: SIM118 - the reader has no __iter__
            e = reader._entry(key)
            m = re.match(r"model\.layers\.(\d+)\.[^.]+\.experts\.(\d+)\.", key)
            fused = re.match(r"model\.layers\.(\d+)\.[^.]+\.experts\.[a-z_]+$", key)
            if m:
                if int(m.group(2)) in kept[int(m.group(1))]:
                    want.append((e.file.name, e.start, e.nbytes))
            elif fused:
                row, ids = e.nbytes // e.shape[0], kept[int(fused.group(1))]
                runs = [[ids[0]]]
                for i in ids[1:]:
                    runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
                want += [(e.file.name, e.start + r[0] * row, len(r) * row) for r in runs]
            else:
                want.append((e.file.name, e.start, e.nbytes))
    return sorted(want)


def test_tied_embeddings_stay_tied(checkpoints, tok):
    folder, full = checkpoints["qwen3_moe_tied"]
    pattern = moeprune.profile(full, PROMPTS, tokenizer=tok).select(keep=0.5)
    slim = load_slim(folder, pattern, record_reads=True)
    assert slim.get_output_embeddings().weight is slim.get_input_embeddings().weight
    with CheckpointReader(folder) as reader:
        assert "lm_head.weight" not in reader  # stored once, as on the hub
    assert sorted(slim.moeprune_load_report.reads) == _expected_reads(folder, pattern.kept)


@pytest.mark.parametrize("model_type", ["mixtral", "minimax", "gpt_oss"])  # single file, sharded, fused on disk
def test_reads_exactly_the_kept_bytes(checkpoints, model_type):
    folder, full = checkpoints[model_type]
    adapter = get_adapter(full)
    rng = random.Random(0)
    pattern = _pattern(full, {layer: sorted(rng.sample(range(8), 4)) for layer in adapter.moe_layers(full.config)})
    report = load_slim(folder, pattern, record_reads=True).moeprune_load_report
    want = _expected_reads(folder, pattern.kept)
    if model_type == "minimax":
        assert len({f for f, *_ in want}) > 1  # the reads span several shards
    assert sorted(report.reads) == want  # no byte of a pruned expert, nothing read twice
    assert report.bytes_read == sum(n for *_, n in want) and report.tensors_read == len(want)
    unrecorded = load_slim(folder, pattern).moeprune_load_report  # the log is opt-in; the counters are not
    assert unrecorded.reads == [] and (unrecorded.bytes_read, unrecorded.tensors_read) == (report.bytes_read,
                                                                                           len(want))


def test_fused_checkpoint_layout(tmp_path, checkpoints):
    """A checkpoint stored with fused expert tensors reads expert rows by byte range."""
    from safetensors.torch import save_file

    _, full = checkpoints["qwen3_moe"]
    full.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "model.safetensors"))
    kept = [1, 3, 4, 6]
    pattern = _pattern(full, {layer: kept for layer in range(3)})
    slim = load_slim(tmp_path, pattern, record_reads=True)
    _compare(full, slim, pattern)
    # exactly the kept rows of each fused expert tensor (runs of consecutive rows are one read), and
    # every other tensor whole
    want = []
    with CheckpointReader(tmp_path) as reader:
        for key in reader.keys():  # noqa: SIM118 - the reader has no __iter__
            e = reader._entry(key)
            if ".experts." in key:
                row = e.nbytes // e.shape[0]
                for first, last in ((1, 1), (3, 4), (6, 6)):
                    want.append(("model.safetensors", e.start + first * row, (last - first + 1) * row))
            else:
                want.append(("model.safetensors", e.start, e.nbytes))
    assert sorted(slim.moeprune_load_report.reads) == sorted(want)


def test_bad_input(tmp_path, checkpoints, tok):
    folder, full = checkpoints["mixtral"]
    other_folder, other = checkpoints["olmoe"]
    foreign = moeprune.profile(other, PROMPTS, tokenizer=tok).select(keep=0.5)
    with pytest.raises(MoepruneError, match="another model|covers MoE layers|experts per layer"):
        load_slim(folder, foreign)
    same_arch = save_tiny("mixtral", tmp_path / "seed7", seed=7)
    wrong_weights = moeprune.profile(same_arch, PROMPTS, tokenizer=tok).select(keep=0.5)
    with pytest.raises(MoepruneError, match="another model"):
        load_slim(folder, wrong_weights)
    with pytest.raises(MoepruneError, match="not found"):
        load_slim(tmp_path / "nowhere", wrong_weights)
    bad = _pattern(full, {0: [0], 1: [0, 1], 2: [0, 1]})
    with pytest.raises(MoepruneError, match="layer 0.*top-k"):
        load_slim(folder, bad)
    anonymous = Pattern({0: [0, 1], 1: [0, 1], 2: [0, 1]}, {"num_experts": 8})
    with pytest.raises(MoepruneError, match="no fingerprint"):
        load_slim(folder, anonymous)
    load_slim(folder, anonymous, verify=False)  # the caller vouches for it


def test_missing_shard_and_corrupt_header(tmp_path, checkpoints):
    import shutil

    src, full = checkpoints["qwen2_moe"]  # saved sharded (odd index)
    pattern = _pattern(full, {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]})
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (broken / victim).unlink()
    with pytest.raises(MoepruneError, match=victim):
        load_slim(broken, pattern)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    with open(corrupt / victim, "r+b") as f:
        f.seek(8)
        f.write(b"garbage!" * 4)
    with pytest.raises(MoepruneError, match=victim):
        load_slim(corrupt, pattern)


def test_dtype_and_vanilla_class(checkpoints):
    folder, full = checkpoints["qwen3_moe"]
    pattern = _pattern(full, {layer: [0, 2, 4, 6] for layer in range(3)})
    slim = load_slim(folder, pattern, dtype="bfloat16")
    assert next(slim.parameters()).dtype == torch.bfloat16
    assert isinstance(slim, AutoModelForCausalLM._model_mapping[type(full.config)])
