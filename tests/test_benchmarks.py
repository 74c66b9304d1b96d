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


def test_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "memory.json"
    printed = run("memory.py", "--smoke", "--output", str(out))
    data = json.loads(out.read_text())
    assert {r["setting"] for r in data["rows"]} == {"today", "tiled_loss", "tiled_mlp", "offload", "defaults"}
    for r in data["rows"]:
        assert r["measured"] > 0 and 0.9 <= r["ratio"] <= 1.1, r  # the plan within 10 % of the measurement
        assert set(r["phases"]) == {"forward", "loss backward", "layer backward", "embedding backward"}
    assert {(p["model"], p["finetune"], p["setting"]) for p in data["plan"]} >= {
        ("meta-llama/Llama-3.1-8B", "LoRA+ (bf16)", "offload"), ("meta-llama/Llama-3.2-1B", "QLoRA", "defaults")}
    assert out.with_suffix(".png").stat().st_size > 0
    assert "worst |ratio - 1|" in printed
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--smoke"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "outside docs/" in proc.stderr  # a smoke run never writes into docs/


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


def test_gpu_benchmark_smoke(tmp_path):
    """benchmarks/gpu.py --smoke: the GPU benchmark's code on CPU at tiny sizes, every table filled and written."""
    out = tmp_path / "gpu.json"
    printed = run("gpu.py", "--smoke", "--op-lengths", "256", "--step-lengths", "128,256", "--output", str(out))
    written = json.loads(out.read_text())
    checks = [r for r in written["correctness"] if r["status"] != "n/a"]
    assert {r["backend"] for r in checks} == {"sdpa", "cpu"} and {r["dtype"] for r in checks} == {"bf16", "fp32"}
    assert {r["case"] for r in checks} == {"regular", "ragged L", "9/3 heads", "left padding", "right padding",
                                          "packed docs"}
    assert all(r["status"] == "ok" for r in checks)
    assert all(r["error"] < 1e-4 for r in checks if r["dtype"] == "fp32")
    # bf16: S2's error is of the size of full SDPA's own on the same inputs
    assert all(r["error"] < 3 * r["full_sdpa_error"] + 1e-3 for r in checks if r["dtype"] == "bf16")
    assert {r["variant"] for r in written["op"]} == {"full", "s2 sdpa", "s2 cpu", "short"}
    assert [r["length"] for r in written["step"]] == [128, 256]
    assert all(r["full_s"] > 0 and r["s2_s"] > 0 and r["fitted_limit"] >= 1 for r in written["step"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert "(a) correctness" in printed and "(c) LoRA+ training step" in printed
    source = (ROOT / "benchmarks" / "gpu.py").read_text()
    top_imports = {line.split()[1].split(".")[0] for line in source.splitlines()
                   if line.startswith(("import ", "from "))}
    assert top_imports <= {"__future__", "argparse", "gc", "sys", "time", "pathlib", "torch", "_measure",
                           "longlora"}  # stock PyTorch image: nothing else at import time
