"""CheckpointReader: byte-exact partial reads of safetensors checkpoints."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoepruneError
from moeprune.reader import CheckpointReader


def _data_start(path: Path, name: str) -> int:
    """Absolute offset of a tensor's first byte, computed independently of the reader."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fused_f32": torch.randn(8, 6, 4, generator=g),
        "fused_bf16": torch.randn(8, 6, 4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(3, 5, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(10, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture
def single(tmp_path: Path) -> Path:
    save_file(_tensors(), tmp_path / "model.safetensors", metadata={"format": "pt", "note": "hi"})
    return tmp_path


def _assert_all_equal(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    with CheckpointReader(folder) as r:
        assert sorted(r.keys()) == sorted(expected)
        for name, want in expected.items():
            got = r.get(name)
            assert got.dtype == want.dtype == r.dtype(name), name
            assert tuple(got.shape) == tuple(want.shape) == r.shape(name), name
            assert torch.equal(got, want), name
            assert r.nbytes(name) == want.numel() * want.element_size()
            got.zero_()  # writable, owns its memory: a fresh read is unaffected
            assert torch.equal(r.get(name), want), name


def test_single_file_every_dtype(single: Path) -> None:
    _assert_all_equal(single, load_file(single / "model.safetensors"))
    with CheckpointReader(single) as r:
        assert r.metadata() == {"format": "pt", "note": "hi"}
        assert "f16" in r and "nope" not in r
        assert r.file_of("u8") == single / "model.safetensors"
        before = r.n_reads
        assert r.get("empty").shape == (0, 4)
        assert r.n_reads == before  # nothing to read for a zero-size tensor


def test_float8(tmp_path: Path) -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch has no float8")
    t = {"a": torch.randn(4, 3).to(torch.float8_e4m3fn), "b": torch.randn(2, 5).to(torch.float8_e5m2)}
    save_file(t, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as r:
        for name, want in t.items():
            assert r.get(name).dtype == want.dtype
            assert torch.equal(r.get(name).view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("name", ["fused_f32", "fused_bf16"])
def test_get_rows_merges_contiguous_runs(single: Path, name: str) -> None:
    full = _tensors()[name]
    rows = [1, 2, 3, 6]
    row_bytes = 6 * 4 * full.element_size()
    start = _data_start(single / "model.safetensors", name)
    with CheckpointReader(single, record=True) as r:
        got = r.get_rows(name, rows)
        assert got.shape == (4, 6, 4) and got.dtype == full.dtype
        assert torch.equal(got, full[rows])
        assert r.reads == [
            ("model.safetensors", start + 1 * row_bytes, 3 * row_bytes),
            ("model.safetensors", start + 6 * row_bytes, row_bytes),
        ]
        assert r.bytes_read == 4 * row_bytes


def test_get_rows_order_empty_and_bad_rows(single: Path) -> None:
    full = _tensors()["fused_f32"]
    with CheckpointReader(single, record=True) as r:
        assert torch.equal(r.get_rows("fused_f32", [6, 0, 1, 1]), full[[6, 0, 1, 1]])
        assert [n // 96 for _, _, n in r.reads] == [1, 2, 1]  # runs 6 | 0-1 | 1: only ascending neighbours merge
        assert r.get_rows("fused_f32", []).shape == (0, 6, 4)
        assert torch.equal(r.get_rows("i64", [2]), _tensors()["i64"][[2]])
        with pytest.raises(IndexError):
            r.get_rows("fused_f32", [8])
        with pytest.raises(IndexError):
            r.get_rows("fused_f32", [-1])
        with pytest.raises(MoepruneError, match="scalar"):
            r.get_rows("scalar", [0])


def test_get_is_one_pread(single: Path) -> None:
    with CheckpointReader(single, record=True) as r:
        r.get("fused_f32")
        start = _data_start(single / "model.safetensors", "fused_f32")
        assert r.reads == [("model.safetensors", start, 8 * 6 * 4 * 4)]
        assert r.bytes_read == 8 * 6 * 4 * 4 and r.header_bytes_read > 0 and r.n_reads == 1


def test_reads_are_counted_but_not_logged_by_default(single: Path) -> None:
    with CheckpointReader(single) as r:  # a long-lived reader must not grow a log of every read
        for _ in range(3):
            r.get("fused_f32")
            r.get_rows("fused_f32", [1, 2, 6])
        assert r.reads == [] and r.n_reads == 3 * 3 and r.bytes_read == 3 * (8 + 3) * 6 * 4 * 4


def test_sharded_handwritten_index(tmp_path: Path) -> None:
    t = _tensors()
    names = sorted(t)
    a, b = names[: len(names) // 2], names[len(names) // 2:]
    save_file({k: t[k] for k in a}, tmp_path / "shard-a.safetensors", metadata={"which": "a"})
    save_file({k: t[k] for k in b}, tmp_path / "shard-b.safetensors", metadata={"which": "b"})
    weight_map = {k: "shard-a.safetensors" for k in a} | {k: "shard-b.safetensors" for k in b}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_all_equal(tmp_path, t)
    with CheckpointReader(tmp_path, record=True) as r:
        assert r.file_of(b[0]) == tmp_path / "shard-b.safetensors"
        assert r.metadata() == {"which": "a"}
        r.get(a[0])
        r.get(b[0])
        assert {f for f, _, _ in r.reads} == {"shard-a.safetensors", "shard-b.safetensors"}
        assert len(r._fds) == 2
    assert r._fds == {}


def test_glob_fallback_without_index(tmp_path: Path) -> None:
    t = _tensors()
    save_file({"fused_f32": t["fused_f32"]}, tmp_path / "x.safetensors")
    save_file({"u8": t["u8"]}, tmp_path / "y.safetensors")
    _assert_all_equal(tmp_path, {"fused_f32": t["fused_f32"], "u8": t["u8"]})


def test_transformers_mixtral_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                               num_experts_per_tok=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    expected: dict[str, torch.Tensor] = {}
    for shard in shards:
        expected.update(load_file(shard))
    assert any(".experts.3." in k for k in expected)  # hub per-expert keys
    _assert_all_equal(tmp_path, expected)
    router = next(k for k in expected if k.endswith("layers.1.block_sparse_moe.gate.weight"))
    with CheckpointReader(tmp_path) as r:
        assert torch.equal(r.get_rows(router, [0, 2, 3]), expected[router][[0, 2, 3]])
        assert r.bytes_read == 3 * 16 * expected[router].element_size()


# ---- bad input ----------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MoepruneError, match="nowhere"):
        CheckpointReader(tmp_path / "nowhere")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(MoepruneError, match="no safetensors"):
        CheckpointReader(tmp_path)


def test_index_naming_missing_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    weight_map = {"a": "s1.safetensors", "b": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MoepruneError, match=r"missing shard s2\.safetensors"):
        CheckpointReader(tmp_path)


def test_index_naming_tensor_absent_from_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    weight_map = {"a": "s1.safetensors", "b": "s1.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MoepruneError, match="s1.safetensors.*'b'"):
        CheckpointReader(tmp_path)


def test_truncated_file(single: Path) -> None:
    path = single / "model.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(MoepruneError, match=r"model\.safetensors.*truncated"):  # at open or at the read
        r = CheckpointReader(single)
        names = r.keys()
        for name in names:
            r.get(name)


def test_truncated_inside_header(single: Path) -> None:
    path = single / "model.safetensors"
    os.truncate(path, 20)
    with pytest.raises(MoepruneError, match=r"model\.safetensors.*truncated"):
        CheckpointReader(single)


def test_truncated_after_open_is_short_read(single: Path) -> None:
    path = single / "model.safetensors"
    with CheckpointReader(single) as r:
        os.truncate(path, _data_start(path, "fused_f32") + 10)
        with pytest.raises(MoepruneError, match=r"model\.safetensors.*truncated"):
            r.get("fused_f32")


def test_corrupt_header_garbage(single: Path) -> None:
    path = single / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8:8 + n] = b"\xff#garbage!" * (n // 10) + b"x" * (n % 10)
    path.write_bytes(bytes(raw))
    with pytest.raises(MoepruneError, match=r"model\.safetensors.*corrupt header"):
        CheckpointReader(single)


def test_corrupt_header_absurd_length(single: Path) -> None:
    path = single / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    with pytest.raises(MoepruneError, match=r"model\.safetensors.*corrupt header"):
        CheckpointReader(single)


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_corrupt_header_offsets_disagree_with_shape(tmp_path: Path) -> None:
    _write_raw(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}},
               bytes(24))
    with pytest.raises(MoepruneError, match=r"model\.safetensors.*corrupt header.*'w'"):
        CheckpointReader(tmp_path)


def test_unsupported_dtype(tmp_path: Path) -> None:
    _write_raw(tmp_path / "model.safetensors", {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
               bytes(8))
    with pytest.raises(MoepruneError, match="unsupported dtype"):
        CheckpointReader(tmp_path)


def test_unknown_tensor_name(single: Path) -> None:
    with CheckpointReader(single) as r:
        for call in (r.get, r.shape, r.dtype, r.file_of, r.nbytes, lambda n: r.get_rows(n, [0])):
            with pytest.raises(KeyError, match="no.such.tensor"):
                call("no.such.tensor")
