"""Confirm a recipe choice at full training length, on the validation split only.

The recipe sweep trains each variant for 1,400 steps; the bundled model trains for 1,900. This
evaluates two full-length demo models with the sweep's own protocol (`recipe_sweep.evaluate_variant`:
validation = calib.jsonl[16:], eval = eval.jsonl reported only) and prints which one the
validation split picks.

    python benchmarks/recipe_confirm.py OLD_MODEL_DIR NEW_MODEL_DIR [--corpora ../shared/corpora]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _record import add_record_args, record
from recipe_sweep import choose, evaluate_variant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs=2, type=Path, help="two model folders: the current choice, the candidate")
    ap.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    ap.add_argument("--eval-tokens", type=int, default=20000)
    ap.add_argument("--json", type=Path, help="also write the full results here")
    add_record_args(ap)
    args = ap.parse_args()
    with record("recipe_confirm", args.results, args.record):
        res = {}
        for path in args.models:
            res[str(path)] = evaluate_variant(path, args.corpora, "cpu", args.eval_tokens)
            for split in ("validation", "eval"):
                g = res[str(path)][split]["geomean"]
                print(f"{str(path):<28} {split:<10}", " ".join(f"{k}={v:.3f}" for k, v in g.items()), flush=True)
        print("chosen on validation:", choose({k: v["validation"]["geomean"] for k, v in res.items()}))
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
