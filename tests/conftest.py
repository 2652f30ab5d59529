import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_corpora():
    path = SHARED / "corpora"
    if not path.is_dir():
        pytest.skip("../shared/corpora is not available")
    return path


@pytest.fixture
def store(tmp_path):
    """A router-signature store of three synthetic patterns (code, bible, legal) around one-hot centres."""
    from test_store import onehot, synthetic

    from moeprune.store import PatternStore

    s = PatternStore(tmp_path / "store", signature="router")
    for i, d in enumerate(["code", "bible", "legal"]):
        prof, pat = synthetic(d, onehot(i), seed=i)
        s.add(d, prof, pat)
    return s


@pytest.fixture(scope="session")
def demo_store_path(tmp_path_factory):
    """A store of three domains of the bundled demo model (profiled once per test session)."""
    from moeprune.demo import DEMO_DATA, DEMO_MODEL

    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("no bundled demo model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeprune
    from moeprune.prompts import read_prompts
    from moeprune.store import PatternStore

    root = tmp_path_factory.mktemp("demo-store")
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    store = PatternStore(root / "store")
    for d in ("python", "legal", "bible"):
        prof = moeprune.profile(model, read_prompts(DEMO_DATA / f"{d}.calib.jsonl"), tokenizer=tok, domain=d,
                                max_length=256)
        store.add(d, prof, prof.select(keep=0.5), rebuild=False)
    store.rebuild_index()
    return root / "store"
