"""Cost of `load_slim` and `export` against a plain `from_pretrained`, from a cold page cache.

Checkpoint: a Mixtral-layout model with random bf16 weights, sharded at 500MB, hub per-expert keys
(what `save_pretrained` writes). Default: hidden 1024, intermediate 3584, 12 layers, 8 experts, top-2,
vocab 32000, 16 heads / 4 kv heads (about 2.3 GB on disk). `--quick`: about 250 MB. It is generated
once into `--dir` (skipped when the folder already has a config.json). A block-FP8 copy of it (the
DeepSeek-V3 / Qwen3-FP8 layout: every attention and expert Linear stored as float8_e4m3fn `X.weight` with a
float32 `X.weight_scale_inv` per 128x128 block, scale = block amax / 448; router, norms, embeddings and
lm_head stay bf16; `quantization_config` quant_method fp8) is written next to it, into `<dir>-fp8`.

Cases, each in a fresh subprocess, after the parent has fsynced and dropped every checkpoint file from
the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`, checked with `mincore`):
  - full:      `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)` (the baseline)
  - slim-50:   `moeprune.load_slim` keeping 4 of 8 experts per layer
  - slim-25:   `moeprune.load_slim` keeping 2 of 8 experts per layer
  - export-50: `moeprune.export` of the 50% pattern into a temporary folder, with max_shard_size set to
               the source's (500MB; `--export-shard-size`) so that streaming shard by shard is visible
  - slim-50-fp8: `moeprune.load_slim` of the FP8 copy keeping the same 4 of 8 experts, dequantized into
               bf16 (its kept tensors are the FP8 bytes, scale grids included; its size is the bf16 model's)

Every checkpoint file, bf16 and FP8, is dropped before every child. Per case the child reports: bytes
read from disk (`read_bytes` of /proc/self/io around the call), peak RSS (`ru_maxrss`, so it includes
the torch/transformers/moeprune imports; the RSS right before the call is shown too; the parent never
imports torch, since a child inherits its parent's RSS high-water mark through exec), wall time of the
call, and the loaded model's parameter bytes. The parent also records, via `mincore`, how much of the
checkpoint sat in the page cache before and after each child. Before the runs the checkpoint is read
once, so a VM host's own disk cache (which the guest cannot drop) is equally warm for every run;
`--no-warmup` skips that. Each pattern's kept tensor bytes come from the safetensors headers. Cases run
round-robin `--repeats` times; the table shows medians.

The parent's output is logged to benchmarks/results/ (`--no-record` for a smoke run); children never record.

Run: python benchmarks/slim_load.py [--quick] [--dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import add_record_args, record

MIB = 2**20
DEFAULT_DIR = "/tmp/moeprune-bench/mixtral-2g"
QUICK_DIR = "/tmp/moeprune-bench/mixtral-quick"
SEED = 0

FULL_CONFIG = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                   shard="500MB")
QUICK_CONFIG = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                    shard="50MB")

# (case name, kind, experts kept per layer or None, checkpoint: "bf16" or "fp8")
CASES: list[tuple[str, str, int | None, str]] = [
    ("full", "full", None, "bf16"),
    ("slim-50", "slim", 4, "bf16"),
    ("slim-25", "slim", 2, "bf16"),
    ("export-50", "export", 4, "bf16"),
    ("slim-50-fp8", "slim", 4, "fp8"),
]
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# the Linears an FP8 release quantizes: attention projections and every expert's w1/w3/w2
FP8_KEY = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight$")
TARGET_READ = 1.02
TARGET_RSS = 1.25
TARGET_WALL_SLACK = 0.10
TARGET_EXPORT_RSS = 1.5


# ---------------------------------------------------------------------------------------- checkpoint
def generate(folder: Path, spec: dict) -> None:
    """Write a random bf16 Mixtral checkpoint to `folder` (atomically: built in a sibling, then renamed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    shard = spec.pop("shard")
    cfg = AutoConfig.for_model("mixtral", tie_word_embeddings=False, **spec)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard)
    del model
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"generated {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def fp8_folder(folder: Path) -> Path:
    """Where the block-FP8 copy of checkpoint `folder` lives."""
    return folder.with_name(folder.name + "-fp8")


def case_folder(folder: Path, fmt: str) -> Path:
    return fp8_folder(folder) if fmt == "fp8" else folder


def quantize_fp8_block(w, block: int = FP8_BLOCK):
    """(float8_e4m3fn codes, float32 scale_inv [ceil(R/b), ceil(C/b)]) of a 2-D weight: per block, scale =
    amax / 448 and codes = w / scale (edge blocks partial)."""
    import torch
    import torch.nn.functional as F

    rows, cols = w.shape
    gr, gc = -(-rows // block), -(-cols // block)
    x = F.pad(w.float(), (0, gc * block - cols, 0, gr * block - rows)).view(gr, block, gc, block)
    scale = (x.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (x / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.view(gr * block, gc * block)[:rows, :cols].contiguous(), scale.contiguous()


def generate_fp8(src: Path, folder: Path) -> None:
    """Write the block-FP8 copy of bf16 checkpoint `src` to `folder`, shard for shard (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in weight_files(src):
        out = {}
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(key)
                if FP8_KEY.match(key):
                    out[key], out[key + "_scale_inv"] = quantize_fp8_block(t)
                else:
                    out[key] = t
        save_file(out, tmp / shard.name, metadata={"format": "pt"})
        for key, t in out.items():
            weight_map[key] = shard.name
            total += t.numel() * t.element_size()
    if not any(k.endswith("_scale_inv") for k in weight_map):
        raise RuntimeError(f"no weight of {src} matched {FP8_KEY.pattern}: nothing was quantized")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                                     "activation_scheme": "dynamic"}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            shutil.copy2(src / extra, tmp / extra)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"generated {folder} (block FP8) in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------- page cache
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def drop_cache(files: list[Path]) -> None:
    """Flush and evict each file's pages from the page cache."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(files: list[Path]) -> int:
    """Read every file once (to warm caches below this VM, which the guest cannot drop); return the bytes."""
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(16 * MIB):
                total += len(chunk)
    return total


def resident_bytes(files: list[Path]) -> tuple[int, int]:
    """(bytes of these files in the page cache, their total size), from mincore."""
    page = mmap.PAGESIZE
    resident = total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap failed")
            try:
                vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
                if _libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                resident += sum(b & 1 for b in vec) * page
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return min(resident, total), total


# ---------------------------------------------------------------------------------------- sizes
def kept_bytes(folder: Path, k: int | None, only: str | None = None) -> int:
    """Bytes of the tensors a k-of-E pattern keeps: non-expert tensors, kept experts, kept router rows
    (FP8 scale grids included); `only`: just the keys ending so."""
    from transformers import AutoConfig

    from moeprune import get_adapter
    from moeprune.reader import CheckpointReader

    config = AutoConfig.from_pretrained(folder)
    adapter = get_adapter(config)
    n_exp = adapter.num_experts(config)
    routers = {key for layer in adapter.moe_layers(config) for key in adapter.ckpt_router_keys(layer)}
    expert = re.compile(r"^model\.layers\.\d+\.[^.]+\.experts\.\d+\.")
    frac = 1.0 if k is None else k / n_exp
    total = 0
    with CheckpointReader(folder) as reader:
        for key in reader.keys():  # noqa: SIM118 - the reader has no __iter__
            if only is not None and not key.endswith(only):
                continue
            n = reader.nbytes(key)
            if expert.match(key) or key in routers:
                total += round(n * frac)  # uniform patterns: every expert of a layer has the same size
            else:
                total += n
    return total


def prepare(folder: Path, spec: dict) -> dict:
    """(In a child) generate the checkpoints if needed, write the patterns, size the kept tensors.

    A pattern names its model (fingerprint), so each checkpoint gets its own; both draw the same experts."""
    fp8 = fp8_folder(folder)
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        generate(folder, spec)
        shutil.rmtree(fp8, ignore_errors=True)  # made from the old weights
    if not (fp8 / "config.json").is_file():
        generate_fp8(folder, fp8)
    patterns = {}
    for name, _, k, fmt in CASES:
        if k is not None:
            src = case_folder(folder, fmt)
            patterns[name] = src.parent / f"{src.name}-pattern-{k}.json"
            make_pattern(src, k, patterns[name])
    kept = {name: kept_bytes(case_folder(folder, fmt), k) for name, _, k, fmt in CASES}
    kept_full = {fmt: kept_bytes(case_folder(folder, fmt), None) for fmt in ("bf16", "fp8")}
    kept_scales = {name: kept_bytes(case_folder(folder, fmt), k, "_scale_inv") for name, _, k, fmt in CASES
                   if fmt == "fp8"}
    return {"patterns": {k: str(v) for k, v in patterns.items()}, "kept": kept, "kept_full": kept_full,
            "kept_scales": kept_scales}


def make_pattern(folder: Path, k: int, path: Path) -> None:
    """A uniform random k-of-E pattern (fixed seed) for this checkpoint, saved to `path`."""
    from transformers import AutoConfig

    import moeprune
    from moeprune.reader import CheckpointReader
    from moeprune.slim import checkpoint_fingerprint, read_routers

    config = AutoConfig.from_pretrained(folder)
    adapter = moeprune.get_adapter(config)
    n_exp = adapter.num_experts(config)
    layers = adapter.moe_layers(config)
    with CheckpointReader(folder) as reader:  # a pattern must name its model; load_slim checks it
        fingerprint = checkpoint_fingerprint(config, read_routers(reader, adapter, layers), adapter, layers)
    rng = random.Random(SEED + k)
    kept = {layer: sorted(rng.sample(range(n_exp), k)) for layer in layers}
    meta = {"num_experts": n_exp, "fingerprint": fingerprint, "strategy": "uniform", "criterion": "random",
            "keep": k, "domains": []}
    moeprune.Pattern(kept, meta).save(path)


# ---------------------------------------------------------------------------------------- child
def _io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def _status(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(kind: str, folder: str, pattern: str | None, out: str | None, shard: str) -> dict:
    """Run one case in this (fresh) process and return its measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    import moeprune

    result: dict = {}
    start_rss = _status("VmRSS")
    io0 = _io_read_bytes()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    elif kind == "slim":
        model = moeprune.load_slim(folder, pattern, dtype=torch.bfloat16)
    else:
        model = None
        moeprune.export(folder, pattern, out, max_shard_size=shard)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    io1 = _io_read_bytes()
    result.update(wall=wall, cpu=cpu, read_bytes=io1 - io0, start_rss=start_rss, hwm=_status("VmHWM"),
                  peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if model is not None:
        result["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        report = getattr(model, "moeprune_load_report", None)
        if report is not None:
            result["requested"] = report.bytes_read
    else:
        shards = weight_files(Path(out))
        result["out_shard_max"] = max(s.stat().st_size for s in shards)
        result["out_shards"] = len(shards)
        result["model_bytes"] = sum(s.stat().st_size for s in shards)
    return result


def run_child(kind: str, folder: Path, pattern: Path | None, shard: str, drop: list[Path]) -> dict:
    """Drop `drop` (every checkpoint's files) from the page cache, then run one case on `folder` in a fresh
    interpreter."""
    out = Path(tempfile.mkdtemp(prefix="export-", dir=folder.parent)) / "out" if kind == "export" else None
    files = all_files(folder)
    drop_cache(drop)
    resident, _ = resident_bytes(files)
    cmd = [sys.executable, __file__, "--child", kind, "--dir", str(folder), "--export-shard-size", shard]
    if pattern is not None:
        cmd += ["--pattern", str(pattern)]
    if out is not None:
        cmd += ["--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"child {kind} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if out is not None:
            shutil.rmtree(out.parent, ignore_errors=True)
    result["resident_before"] = resident
    result["resident_after"] = resident_bytes(files)[0]
    return result


# ---------------------------------------------------------------------------------------- report
def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def _check(value: float, limit: float) -> str:
    return f"{value:.3f} {'✓' if value <= limit else '✗'}"


def report(folder: Path, runs: dict[str, list[dict]], kept: dict[str, int], full_wall: float,
           kept_full: dict[str, int], kept_scales: dict[str, int]) -> list[str]:
    """Print the markdown table and the target checks; return the missed targets."""
    src_max = max(f.stat().st_size for f in weight_files(folder))
    missed: list[str] = []
    print("\n| case | read from disk (MiB) | into page cache (MiB) | kept tensors (MiB) | read/kept | peak RSS (MiB) | RSS before call "
          "(MiB) | model size (MiB) | RSS/size | wall (s), median [min-max] | wall/full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, kind, k, _ in CASES:
        rs = runs[name]
        keys = ("read_bytes", "peak_rss", "start_rss", "model_bytes", "wall", "resident_after")
        med = {key: statistics.median(r[key] for r in rs) for key in keys}
        frac = 1.0 if k is None else k / 8
        read_ratio = med["read_bytes"] / kept[name]
        rss_ratio = med["peak_rss"] / med["model_bytes"]
        wall_ratio = med["wall"] / full_wall
        walls = [r["wall"] for r in rs]
        cells = [name, _mib(med["read_bytes"]), _mib(med["resident_after"]), _mib(kept[name])]
        if kind == "full":
            cells += [f"{read_ratio:.3f}", _mib(med["peak_rss"]), _mib(med["start_rss"]), _mib(med["model_bytes"]),
                      f"{rss_ratio:.3f}"]
            wall_cell = "1.000"
        else:
            cells.append(_check(read_ratio, TARGET_READ))
            cells += [_mib(med["peak_rss"]), _mib(med["start_rss"]), _mib(med["model_bytes"])]
            if kind == "slim":
                cells.append(_check(rss_ratio, TARGET_RSS))
                wall_cell = _check(wall_ratio, frac + TARGET_WALL_SLACK)
                if rss_ratio > TARGET_RSS:
                    missed.append(f"{name}: RSS/size {rss_ratio:.3f} > {TARGET_RSS}")
                if wall_ratio > frac + TARGET_WALL_SLACK:
                    missed.append(f"{name}: wall/full {wall_ratio:.3f} > {frac + TARGET_WALL_SLACK:.2f}")
            else:
                cells.append("(output)")
                wall_cell = f"{wall_ratio:.3f}"
            if read_ratio > TARGET_READ:
                missed.append(f"{name}: read/kept {read_ratio:.3f} > {TARGET_READ}")
        cells += [f"{med['wall']:.2f} [{min(walls):.2f}-{max(walls):.2f}]", wall_cell]
        print("| " + " | ".join(cells) + " |")

    for name, _, k, fmt in CASES:
        if fmt == "fp8":
            rs = runs[name]
            bf16_name = next(n for n, kd, kk, f in CASES if f == "bf16" and kd == "slim" and kk == k)
            fp8_size = sum(f.stat().st_size for f in weight_files(fp8_folder(folder)))
            bf16_size = sum(f.stat().st_size for f in weight_files(folder))
            scales = kept_scales.get(name, 0)
            print(f"\n{name}: the FP8 checkpoint needs {_mib(fp8_size)} MiB on disk vs {_mib(bf16_size)} MiB for the "
                  f"bf16 one ({fp8_size / bf16_size:.3f}x; tensors {_mib(kept_full['fp8'])} vs {_mib(kept_full['bf16'])} "
                  f"MiB); this pattern keeps {_mib(kept[name])} MiB of FP8 tensors (scale grids included) vs "
                  f"{_mib(kept[bf16_name])} MiB of bf16 ({kept[name] / kept[bf16_name]:.3f}x) and loads "
                  f"{_mib(statistics.median(r['model_bytes'] for r in rs))} MiB of bf16 parameters; "
                  f"read/kept is against the FP8 bytes, RSS/size against the bf16 model"
                  + (f"; of the kept FP8 bytes {scales:,} are weight_scale_inv grids" if scales else ""))

    ex = runs["export-50"]
    peak = statistics.median(r["peak_rss"] for r in ex)
    start = statistics.median(r["start_rss"] for r in ex)
    out_max = max(r["out_shard_max"] for r in ex)
    print(f"\nexport-50: {ex[0]['out_shards']} output shard(s), largest {_mib(out_max)} MiB; largest source shard "
          f"{_mib(src_max)} MiB; peak RSS {_mib(peak)} MiB (RSS before the call {_mib(start)} MiB)")
    print(f"  peak RSS / largest output shard = {_check(peak / out_max, TARGET_EXPORT_RSS)} "
          f"(target <= {TARGET_EXPORT_RSS}); peak RSS / largest source shard = {peak / src_max:.3f}; "
          f"(peak - RSS before call) / largest output shard = {(peak - start) / out_max:.3f}")
    if peak / out_max > TARGET_EXPORT_RSS:
        missed.append(f"export-50: peak RSS / largest output shard {peak / out_max:.3f} > {TARGET_EXPORT_RSS}")

    print("\nnet of the interpreter + imports (peak RSS - RSS before the call) / model size, for reference:")
    for name, kind, _, _ in CASES:
        if kind != "export":
            rs = runs[name]
            net = statistics.median((r["peak_rss"] - r["start_rss"]) / r["model_bytes"] for r in rs)
            print(f"  {name}: {net:.3f}")
    print("\nwall / full wall of the same round (cases run round-robin, so this is less exposed to drift), "
          "median [min-max]:")
    for name, kind, _, _ in CASES:
        if kind != "full":
            ratios = [r["wall"] / f["wall"] for r, f in zip(runs[name], runs["full"], strict=True)]
            print(f"  {name}: {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")
    req = {name: [r.get("requested") for r in runs[name]] for name, kind, _, _ in CASES if kind == "slim"}
    print("\nbytes load_slim requested (moeprune_load_report.bytes_read, MiB): "
          + ", ".join(f"{n}: {_mib(v[0])}" for n, v in req.items()))
    hwm = {name: _mib(statistics.median(r["hwm"] for r in rs)) for name, rs in runs.items()}
    print("peak RSS cross-check, VmHWM of the child (MiB): " + ", ".join(f"{n}: {v}" for n, v in hwm.items()))
    worst = max(r["resident_before"] for rs in runs.values() for r in rs)
    print(f"page cache: at most {_mib(worst)} MiB of the checkpoint was resident when a child started "
          f"(mincore after fsync + POSIX_FADV_DONTNEED); 'into page cache' is what was resident after the child")
    print(f"\ntargets: read/kept <= {TARGET_READ} (slim, export; slim-50-fp8 against its kept FP8 bytes); RSS/size <= {TARGET_RSS} (slim); "
          f"wall/full <= kept fraction + {TARGET_WALL_SLACK} (slim); export peak RSS / largest output shard "
          f"<= {TARGET_EXPORT_RSS}")
    print("all targets met" if not missed else "missed:\n  " + "\n  ".join(missed))
    return missed


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~250 MB checkpoint, for a smoke run")
    ap.add_argument("--dir", default=None, help=f"checkpoint folder (default {DEFAULT_DIR}, or {QUICK_DIR})")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each case (median reported)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default 12: ~2.3 GB; 32: ~6 GB, where the interpreter's fixed RSS matters less)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip reading the checkpoint once before the runs (a VM's host may cache the disk, so "
                         "without it the first runs are slower than later ones)")
    ap.add_argument("--export-shard-size", default=None, help="export max_shard_size (default: the source's)")
    ap.add_argument("--child", choices=["prep", "full", "slim", "export"], help=argparse.SUPPRESS)
    ap.add_argument("--pattern", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    add_record_args(ap)
    args = ap.parse_args()
    spec = dict(QUICK_CONFIG if args.quick else FULL_CONFIG)
    default_dir = QUICK_DIR if args.quick else DEFAULT_DIR
    if args.layers:
        spec["num_hidden_layers"] = args.layers
        default_dir = f"{default_dir}-{args.layers}l"
    folder = Path(args.dir or default_dir)
    shard = args.export_shard_size or spec["shard"]

    if args.child == "prep":
        print(json.dumps(prepare(folder, spec)))
        return
    if args.child:
        print(json.dumps(child(args.child, str(folder), args.pattern, args.out, shard)))
        return
    with record("slim_load", args.results, args.record):
        parent(args, folder, shard)


def parent(args: argparse.Namespace, folder: Path, shard: str) -> None:
    """Prepare the checkpoint (in a child), run every case round-robin, print the report."""
    # The parent stays free of torch: a child's ru_maxrss starts from its parent's RSS high-water mark
    # (the kernel keeps the pre-exec mm's peak), so a heavy parent would inflate every child's peak.
    cmd = [sys.executable, __file__, "--child", "prep", "--dir", str(folder)] + (["--quick"] if args.quick else [])
    cmd += ["--layers", str(args.layers)] if args.layers else []
    prep = json.loads(subprocess.run(cmd, capture_output=False, stdout=subprocess.PIPE, text=True,
                                     check=True).stdout.strip().splitlines()[-1])
    for fmt in ("bf16", "fp8"):
        weights = weight_files(case_folder(folder, fmt))
        size = sum(f.stat().st_size for f in weights)
        print(f"checkpoint {case_folder(folder, fmt)} ({fmt}): {len(weights)} shards, {size:,} bytes "
              f"({size / 2**30:.2f} GiB, {size / 1e9:.2f} GB)")
    patterns = {name: Path(v) for name, v in prep["patterns"].items()}
    kept = prep["kept"]
    everything = all_files(folder) + all_files(fp8_folder(folder))

    if args.warmup:
        t0 = time.perf_counter()
        n = read_through(everything)
        print(f"warm-up: read {_mib(n)} MiB in {time.perf_counter() - t0:.1f} s (host-side caches now warm; "
              "the guest page cache is still dropped before every child)")
    runs: dict[str, list[dict]] = {name: [] for name, _, _, _ in CASES}
    for i in range(args.repeats):
        for name, kind, _, fmt in CASES:
            r = run_child(kind, case_folder(folder, fmt), patterns.get(name), shard, everything)
            runs[name].append(r)
            print(f"run {i + 1}/{args.repeats} {name}: wall {r['wall']:.2f} s (CPU {r['cpu']:.2f} s), read {_mib(r['read_bytes'])} MiB, "
                  f"peak RSS {_mib(r['peak_rss'])} MiB (VmHWM {_mib(r['hwm'])}), "
                  f"page cache {_mib(r['resident_before'])} -> {_mib(r['resident_after'])} MiB",
                  flush=True)
    full_wall = statistics.median(r["wall"] for r in runs["full"])
    report(folder, runs, kept, full_wall, prep["kept_full"], prep["kept_scales"])


if __name__ == "__main__":
    main()
