"""Smoke runs of the benchmark programs: they run, print, and write JSON + PNG with the expected rows."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    printed = run("speed.py", "--lengths", "256", "--repeats", "1", "--output", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["part"], r["variant"]) for r in rows} >= {("op", "full"), ("op", "s2"), ("op", "naive"),
                                                       ("step", "s2"), ("step", "short")}
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "full/this" in printed


def test_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "attention.json"
    run("attention.py", "--lengths", "512", "--repeats", "1", "--output", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert rows and rows[0]["length"] == 512 and rows[0]["speedup"] > 0


@pytest.mark.slow
def test_ablation_two_row_smoke(tmp_path):
    out = tmp_path / "ablation.json"
    printed = run("ablation.py", "--rows", "pi_only,lora_plus_s2,ratio_1_4", "--seeds", "0", "--steps", "4",
                  "--windows", "4", "--train-files", "20", "--work-dir", str(tmp_path / "work"), "--output", str(out))
    written = json.loads(out.read_text())
    summary = written["summary"]
    assert [s["row"] for s in summary] == ["pi_only", "lora_plus_s2", "ratio_1_4"]
    assert all(math.isfinite(s["ppl_1024"]) for s in summary)
    assert "Table 6" in printed
    # ratio_1_4 has lora_plus_s2's options: reused, not trained again
    reused = [r for r in written["results"] if r["row"] == "ratio_1_4"]
    assert reused[0]["same_run_as"] == "lora_plus_s2" and summary[2]["ppl_1024"] == summary[1]["ppl_1024"]
    # Table 6's other column: the S2 row evaluated with S2 differs from its full-attention evaluation
    assert summary[0]["ppl_1024_trained_attention"] == summary[0]["ppl_1024"]
    assert math.isfinite(summary[1]["ppl_1024_trained_attention"])
    assert summary[1]["ppl_1024_trained_attention"] != summary[1]["ppl_1024"]
