"""benchmarks/fidelity_gpu.py: the smoke run writes every row, stage and claim; the corpus split is by file."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # appended: its module names (attention, speed) shadow nothing

import fidelity_gpu  # noqa: E402

# Runs the script as `python benchmarks/fidelity_gpu.py ...` would, with `datasets` made unfindable: the GPU image
# has no `datasets`, so nothing on the path (transformers' Trainer included) may need it.
WITHOUT_DATASETS = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec
def hidden(name, *args, **kwargs):
    return None if name == "datasets" or name.startswith("datasets.") else find_spec(name, *args, **kwargs)
importlib.util.find_spec = hidden
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "datasets" or name.startswith("datasets."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test: the GPU image has none)")
sys.meta_path.insert(0, Hide())
script = sys.argv[1]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
assert "datasets" not in sys.modules
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity")
    out = tmp / "out" / "fidelity_gpu.json"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_DATASETS, str(ROOT / "benchmarks" / "fidelity_gpu.py"), "--smoke",
         "--work-dir", str(tmp / "work"), "--output", str(out)],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out, proc.stdout


def test_smoke_writes_every_row_seed_and_stage(smoke):
    written, out, printed = smoke
    assert set(written) == {"meta", "results", "summary", "claims", "readings"}
    meta = written["meta"]
    plan = fidelity_gpu.SMOKE
    assert meta["lengths"] == [plan.base_length, plan.target] == [64, 256]
    assert meta["device"] == "cpu" and meta["smoke"] is True and meta["passkey_template"] == "paper"
    summary = {s["row"]: s for s in written["summary"]}
    assert list(summary) == list(fidelity_gpu.FIDELITY_ROWS)
    for row, s in summary.items():
        assert s["seeds"] == (2 if row in fidelity_gpu.KEY_ROWS else 1), row
        for key in ("ppl_64", "ppl_256", "ppl_256_trained_attention"):
            assert math.isfinite(s[key]) and 1.0 < s[key] < plan.vocab_size, (row, key, s[key])
        assert 0.0 <= s["passkey"] <= 1.0
    # every trained run has the calibrated steps, within the plan's clamp; PI only trains nothing
    assert plan.min_steps <= meta["steps"] <= plan.max_steps
    assert meta["calibration"]["steps"] == meta["steps"] and meta["calibration"]["step_seconds"] > 0
    for r in written["results"]:
        assert r["steps"] == (0 if r["row"] == "pi_only" else meta["steps"]), r["row"]
    # Table 6's two columns: S2 / short rows measured again under their own attention, the others not
    for row, s in summary.items():
        own_differs = s["ppl_256_trained_attention"] != s["ppl_256"]
        assert own_differs == (row in ("lora_plus_s2", "lora_plus_short")), row
    # the stage times are printed and kept
    assert set(meta["stages_seconds"]) == {"corpus", "base", "rows", "report"}
    assert all(v > 0 for v in meta["stages_seconds"].values())
    for stage in ("corpus", "base", "rows", "report"):
        assert f"== stage {stage}:" in printed
    assert meta["base"]["steps"] == plan.base_steps and math.isfinite(meta["base"]["heldout_ppl_64"])
    assert meta["corpus"]["train_files"] > 0 and meta["corpus"]["heldout_files"] > 0
    assert not out.with_suffix(".partial.json").exists()  # the rows kept as they end, removed once complete
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_claims_match_the_rows_the_miniature_and_the_paper(smoke):
    written, _, printed = smoke
    claims = written["claims"]
    summary = {s["row"]: s for s in written["summary"]}
    this = claims["this run"]
    expected = 100 * (summary["lora_plus_s2"]["ppl_256"] / summary["lora_plus_full"]["ppl_256"] - 1)
    assert this["s2_vs_full_attention_training"] == pytest.approx(expected)
    own = "ppl_256_trained_attention"
    expected = 100 * (summary["lora_plus_short"][own] / summary["lora_plus_s2"][own] - 1)
    assert this["no_shift_vs_shift_own_attention"] == pytest.approx(expected)
    # the paper's Table 2 / 6 gaps, from its numbers
    paper = claims["paper (7B, 32k)"]
    assert paper["s2_vs_full_attention_training"] == pytest.approx(100 * (8.12 / 8.08 - 1))
    assert paper["no_shift_vs_shift_full_eval"] == pytest.approx(100 * (8.39 / 8.12 - 1))
    assert paper["no_shift_vs_shift_own_attention"] == pytest.approx(100 * (9.17 / 8.64 - 1))
    assert paper["lora_vs_lora_plus"] == pytest.approx(100 * (11.44 / 8.12 - 1))
    # the 2.4M miniature's, read from the committed ablation JSON
    mini = {s["row"]: s for s in json.loads((ROOT / "docs/benchmarks/ablation_300steps.json").read_text())["summary"]}
    assert claims["2.4M, 300 steps"]["s2_vs_full_attention_training"] == pytest.approx(
        100 * (mini["lora_plus_s2"]["ppl_1024"] / mini["lora_plus_full"]["ppl_1024"] - 1))
    assert len(written["readings"]) == 3 and "at most 2 % worse" in written["readings"][0]
    assert "8.12" in printed and "2.4M, 300 steps" in printed


def test_corpus_split_is_by_file_deterministic_and_capped():
    from longlora.embedded import _is_heldout

    plan = fidelity_gpu.SMOKE
    first, second = fidelity_gpu.split_corpus(plan), fidelity_gpu.split_corpus(plan)
    train = [k for k, _ in first["train"]]
    heldout = [k for k, _ in first["heldout"]]
    assert train == [k for k, _ in second["train"]] and heldout == [k for k, _ in second["heldout"]]
    assert train and heldout and not set(train) & set(heldout)
    assert all(_is_heldout(k) for k in heldout) and not any(_is_heldout(k) for k in train)
    texts = [x for _, x in first["train"] + first["heldout"]]
    assert len(set(texts)) == len(texts)  # no file's text twice: nothing held out is also trained on
    assert first["train_bytes"] <= plan.corpus_mb * 2**20 and first["heldout_bytes"] <= plan.heldout_mb * 2**20
    assert {k.split("/")[0] for k in train + heldout} <= {"stdlib", "site-packages", "site-packages-1"}


def test_token_blocks_are_the_stream_cut_in_blocks():
    import torch

    blocks = fidelity_gpu.TokenBlocks(torch.arange(10), 4)
    assert len(blocks) == 2
    assert blocks[1]["input_ids"].tolist() == [4, 5, 6, 7] == blocks[1]["labels"].tolist()
    with pytest.raises(ValueError, match="no block of 16 tokens"):
        fidelity_gpu.TokenBlocks(torch.arange(10), 16)


def test_plan_overrides_and_their_errors():
    args = fidelity_gpu.argparse.Namespace(smoke=False, set=["factor=8", "base_seconds=200", "steps=none"], steps=None)
    plan = fidelity_gpu.parse_plan(args)
    assert plan.target == 4096 and plan.base_seconds == 200.0 and plan.steps is None
    for bad in (["nope=1"], ["factor=1"], ["min_steps=5000"], ["passkey_depths=0.5,1.5"], ["base_optimizer=sgd"]):
        with pytest.raises(SystemExit):
            fidelity_gpu.parse_plan(fidelity_gpu.argparse.Namespace(smoke=False, set=bad, steps=None))
