"""moeprune on a CUDA device: the CPU test suite's key equalities, run on the GPU.

For every supported family (tiny random models from tests/tiny.py) in float32 and bfloat16 on CUDA:
profiling leaves the logits unchanged, the keep-mask equals the slim model loaded with
`load_slim(..., device="cuda")`, and greedy generation agrees. Then the hub-faithful quantized fixtures
of tests/hub_fixtures.py (DeepSeek-V3 FP8 + MTP, Qwen3 FP8, GPT-OSS MXFP4): `load_slim` on CUDA equals
the dequantized oracle; transformers' native FP8 experts (its GPU kernels) are profiled and agree with
the oracle's profile up to FP8 activation rounding; a native MXFP4 model is either profiled after
transformers dequantized it or refused in one line, never recorded as nothing; and, where vLLM is
installed, vLLM loads the FP8 and MXFP4 exports. Then layer-streamed profiling and evaluation on
CUDA equal the whole model on CUDA (and, with two GPUs or more, data parallel over all of them equals
one). Finally, where vLLM is installed, vllm_swap_check.py's in-engine expert swaps on CUDA. Prints one line per case; the log goes to
benchmarks/results/ (`--no-record` to skip it). Without CUDA it refuses in one line (exit 2).

    python benchmarks/gpu_check.py [--results DIR] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import FAMILIES, char_tokenizer, save_tiny  # noqa: E402

import moeprune  # noqa: E402
from moeprune.hooks import keep_mask  # noqa: E402
from moeprune.models import load_model  # noqa: E402

from _record import add_record_args, record  # noqa: E402

PROMPTS = ["def f(x):\n    return x * 2", "And God said, Let there be light", "#include <stdlib.h>"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_record_args(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():  # refused before recording: a log of nothing run is no record
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing run",
              file=sys.stderr)
        return 2
    with record("gpu_check", args.results, args.record):
        sys.exit(run())  # inside the recording, so that the log's footer shows a failing status


def run() -> int:
    dev = "cuda"
    tok = char_tokenizer()
    failures = 0
    for model_type in FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            save_tiny(model_type, tmp)
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
                full = load_model(tmp, dtype=dtype, device=dev)[0]
                adapter = moeprune.get_adapter(full)
                ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0)).to(dev)
                with torch.no_grad():
                    plain = full(ids).logits.float()
                seen = []
                h = full.register_forward_hook(
                    lambda m, a, k, o, seen=seen: seen.append((k["input_ids"], k["attention_mask"], o.logits.float())),
                    with_kwargs=True)
                prof = moeprune.profile(full, PROMPTS, tokenizer=tok, batch_size=2)
                h.remove()
                with torch.no_grad():
                    d_prof = max((full(input_ids=i, attention_mask=m).logits.float() - lg).abs().max().item()
                                 for i, m, lg in seen)
                pattern = prof.select(keep=0.5)
                slim = moeprune.load_slim(tmp, pattern, dtype=dtype, device=dev)
                masks = {k: v.to(dev) for k, v in pattern.keep_masks().items()}
                with torch.no_grad(), keep_mask(full, adapter, masks):
                    masked = full(ids).logits.float()
                    g_full = full.generate(ids[:1], max_new_tokens=8, do_sample=False)
                with torch.no_grad():
                    d_slim = (slim(ids).logits.float() - masked).abs().max().item()
                    g_slim = slim.generate(ids[:1], max_new_tokens=8, do_sample=False)
                ok = d_prof <= tol and d_slim <= tol and (dtype != torch.float32 or torch.equal(g_full, g_slim))
                failures += not ok
                print(f"{model_type:<12} {str(dtype):<15} profile |diff| {d_prof:.2e}  slim vs mask |diff| {d_slim:.2e}"
                      f"  greedy equal {torch.equal(g_full, g_slim)}  plain {plain.abs().mean().item():.3f}"
                      f"  {'OK' if ok else 'FAIL'}", flush=True)
    failures += pool_check(tok)
    failures += quantized_check(tok)
    failures += stream_check()
    failures += swap_check()
    print("ALL OK" if not failures else f"{failures} FAILED")
    return int(failures > 0)


def pool_check(tok) -> int:
    """The serving ExpertPool on CUDA: switching patterns gives load_slim's logits."""
    from moeprune.serve import ExpertPool

    failures = 0
    for model_type in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        with tempfile.TemporaryDirectory() as tmp:
            full = save_tiny(model_type, tmp)
            prof = moeprune.profile(full, PROMPTS, tokenizer=tok)
            a, b = prof.select(keep=0.5, criterion="easy_ep"), prof.select(keep=0.5, criterion="random", seed=1)
            ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0)).to("cuda")
            with ExpertPool(tmp, 0.75, device="cuda") as pool:
                for pattern in (a, b, a):
                    with pool.serve(pattern) as lease, torch.no_grad():
                        got = pool.model(ids).logits.float()
                    slim = moeprune.load_slim(tmp, pattern, device="cuda")
                    with torch.no_grad():
                        want = slim(ids).logits.float()
                    d = (got - want).abs().max().item()
                    ok = d <= 1e-4
                    failures += not ok
                    print(f"pool {model_type:<12} cuda  |diff| vs load_slim {d:.2e}  read {lease.bytes_read} B  "
                          f"{'OK' if ok else 'FAIL'}", flush=True)
    return failures


def stream_check() -> int:
    """Layer-streamed profiling and evaluation on CUDA equal the whole model on CUDA (same device,
    same dtype: max relative difference <= 1e-6 on every statistic, perplexity to 1e-6)."""
    failures = 0
    docs = ["some evaluation text here for testing perplexity, " * 3, "another document, with punctuation!"]
    for model_type in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        with tempfile.TemporaryDirectory() as tmp:
            save_tiny(model_type, tmp)
            for dtype in ("float32", "bfloat16"):
                whole = moeprune.profile(tmp, PROMPTS, stream=False, dtype=dtype, device="cuda", batch_size=2)
                streamed = moeprune.profile(tmp, PROMPTS, dtype=dtype, device="cuda", batch_size=2)
                rel = max(((whole.stats[k] - streamed.stats[k]).abs().max() /
                           whole.stats[k].abs().max().clamp(min=1e-30)).item() for k in whole.stats)
                e_whole = moeprune.evaluate(tmp, docs, window=16, stream=False, dtype=dtype, device="cuda")
                e_stream = moeprune.evaluate(tmp, docs, window=16, dtype=dtype, device="cuda")
                d_eval = abs(e_whole.nll - e_stream.nll) / abs(e_whole.nll)
                ok = rel <= 1e-6 and d_eval <= 1e-6
                failures += not ok
                print(f"stream {model_type:<12} {dtype:<9} cuda: profile max rel diff {rel:.2e}, "
                      f"perplexity rel diff {d_eval:.2e}  {'OK' if ok else 'FAIL'}", flush=True)
                failures += parallel_check(tmp, streamed, e_stream, docs, model_type, dtype)
    return failures


def parallel_check(folder: str, one, e_one, docs: list[str], model_type: str, dtype: str) -> int:
    """Data parallel over every GPU: the same profile and perplexity as on one (signatures exact,
    statistics to 1e-12 relative: float64 partial sums added in another order)."""
    import torch

    n = torch.cuda.device_count()
    if n < 2:
        print(f"parallel {model_type:<10} {dtype:<9} skipped: {n} GPU (needs 2)", flush=True)
        return 0
    devices = [f"cuda:{i}" for i in range(n)]
    par = moeprune.profile(folder, PROMPTS, dtype=dtype, device=devices, batch_size=2)
    e_par = moeprune.evaluate(folder, docs, window=16, dtype=dtype, device=devices)
    rel = max(((one.stats[k] - par.stats[k]).abs().max() / one.stats[k].abs().max().clamp(min=1e-30)).item()
              for k in one.stats)
    exact = torch.equal(one.signatures, par.signatures) and torch.equal(one.routing, par.routing)
    d_eval = abs(e_one.nll - e_par.nll) / abs(e_one.nll)
    ok = exact and rel <= 1e-12 and d_eval <= 1e-9
    print(f"parallel {model_type:<10} {dtype:<9} {n} GPUs: signatures and routing {'equal' if exact else 'DIFFER'}, "
          f"statistics max rel diff {rel:.2e}, perplexity rel diff {d_eval:.2e}  {'OK' if ok else 'FAIL'}", flush=True)
    return int(not ok)


def swap_check() -> int:
    """The in-engine expert swap on vLLM's CUDA build: benchmarks/vllm_swap_check.py in a process of its
    own (fresh engines vs one swapped python -> bible -> python -> legal); skipped where vLLM is absent."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("vllm") is None:
        print("swap vllm: vLLM is not installed here; skipped")
        return 0
    script = Path(__file__).resolve().parent / "vllm_swap_check.py"
    proc = subprocess.run([sys.executable, str(script), "--no-record"], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith(("✓", "✗", "vllm_swap_check:"))]
    print("\n".join(f"swap vllm {line.strip()}" for line in lines) or f"swap vllm: no result (rc {proc.returncode})",
          flush=True)
    return int(proc.returncode != 0)


def quantized_check(tok) -> int:
    """The quantized hub fixtures on CUDA (each check prints one line; returns the failures)."""
    import hub_fixtures as hf
    from transformers import AutoModelForCausalLM

    from moeprune import MoepruneError

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = {"deepseek_v3 fp8": hf.deepseek_v3_fp8(Path(tmp) / "ds"),
                    "qwen3_moe fp8": hf.qwen3_moe_fp8(Path(tmp) / "qw"),
                    "gpt_oss mxfp4": hf.gpt_oss_mxfp4(Path(tmp) / "go")}
        for name, fx in fixtures.items():  # moeprune's codec on the GPU equals the CPU oracle
            pattern = hf.random_pattern(fx)
            slim = moeprune.load_slim(fx.folder, pattern, dtype="float32", device="cuda")
            with torch.no_grad():
                d = (slim(hf.IDS.to("cuda")).logits.float().cpu() - hf.oracle_logits(fx, pattern)).abs().max().item()
            ok = d <= 1e-4
            failures += not ok
            print(f"quantized {name:<16} load_slim cuda vs oracle |diff| {d:.2e}  {'OK' if ok else 'FAIL'}", flush=True)
        failures += _native_fp8_profile(fixtures["qwen3_moe fp8"], tok, AutoModelForCausalLM)
        failures += _native_mxfp4_profile(fixtures["gpt_oss mxfp4"], tok, AutoModelForCausalLM, MoepruneError)
        failures += _vllm_quantized(fixtures, Path(tmp))
    return failures


def _native_fp8_profile(fx, tok, auto) -> int:
    """transformers' own FP8 experts (GPU kernels) under moeprune's recording implementation."""
    try:
        native = auto.from_pretrained(fx.folder, device_map="cuda").eval()
    except Exception as e:  # transformers itself cannot load it here: say so, it is not moeprune's path
        print(f"quantized native fp8: transformers cannot load the fixture ({str(e).splitlines()[0]}); skipped")
        return 0
    kinds = sorted({type(m).__name__ for m in native.modules() if "FP8" in type(m).__name__})
    got = moeprune.profile(native, PROMPTS, tokenizer=tok)
    ref = moeprune.profile(fx.oracle(), PROMPTS, tokenizer=tok)
    # FP8 activations are rounded per token, so picks near a tie may differ: compare the mass ranking
    cos = torch.nn.functional.cosine_similarity(got.stats["mass"].flatten().float(),
                                                ref.stats["mass"].flatten().float(), dim=0).item()
    same = torch.equal(got.stats["frequency"].sum(-1), ref.stats["frequency"].sum(-1))
    ok = bool(kinds) and cos >= 0.95 and same
    print(f"quantized native fp8 profile ({', '.join(kinds) or 'no FP8 modules'}): mass cosine vs oracle {cos:.4f}, "
          f"picks per layer equal {same}  {'OK' if ok else 'FAIL'}", flush=True)
    return int(not ok)


def _native_mxfp4_profile(fx, tok, auto, error) -> int:
    """A GPT-OSS MXFP4 model as transformers loads it on a GPU: profiled (dequantized) or refused."""
    try:
        native = auto.from_pretrained(fx.folder, device_map="cuda").eval()
    except Exception as e:
        print(f"quantized native mxfp4: transformers cannot load the fixture ({str(e).splitlines()[0]}); skipped")
        return 0
    experts = sorted({type(m).__name__ for m in native.modules() if type(m).__name__.endswith("Experts")})
    try:
        prof = moeprune.profile(native, PROMPTS, tokenizer=tok)
    except error as e:
        ok = "\n" not in str(e) and any("Mxfp4" in k for k in experts)
        print(f"quantized native mxfp4 ({', '.join(experts)}): refused: {e}  {'OK' if ok else 'FAIL'}", flush=True)
        return int(not ok)
    recorded = prof.stats["frequency"].sum().item()
    ok = recorded > 0 and not any("Mxfp4" in k for k in experts)
    print(f"quantized native mxfp4 ({', '.join(experts)}): profiled, {recorded:.0f} picks recorded  "
          f"{'OK' if ok else 'FAIL'}", flush=True)
    return int(not ok)


def _vllm_quantized(fixtures: dict, tmp: Path) -> int:
    """vLLM (GPU kernels) loads the FP8 and MXFP4 exports and generates; skipped where vLLM is absent."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("quantized vllm: vLLM is not installed here; skipped")
        return 0
    import hub_fixtures as hf
    from vllm import LLM, SamplingParams

    failures = 0
    for name, fx in fixtures.items():
        out = tmp / f"{fx.folder.name}-export"
        moeprune.export(fx.folder, hf.random_pattern(fx), out)
        char_tokenizer().save_pretrained(out)
        try:
            llm = LLM(str(out), enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=128)
            text = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
            ok, said = True, f"generated {text!r}"
            del llm
        except Exception as e:
            ok, said = False, str(e).splitlines()[0] if str(e) else type(e).__name__
        failures += not ok
        print(f"quantized vllm {name:<16} export loads: {said}  {'OK' if ok else 'FAIL'}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
