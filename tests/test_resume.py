"""Kill a run anywhere, resume it with `--resume auto`: the result is the uninterrupted run's, bit for bit.

A run (tiny Llama, 6 steps, a checkpoint every 2) is SIGKILLed in a subprocess at a chosen moment through the
LONGLORA_TEST_KILL hook (longlora.checkpoints.kill_point), then resumed until it finishes. Its final adapter must have the
same bytes as an uninterrupted run's, and its train_summary.json the same content (all but the wall time). Also:
`--resume auto` on a finished run writes nothing, a finished checkpoint becomes the final output without training a
step, and a damaged newest checkpoint is skipped for the newest one that loads.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from longlora.checkpoints import COMPLETE, KILL_ENV, SUMMARY
from longlora.config import RUN_CONFIG
from longlora.train import cmd_train
from tiny_models import save_tiny_model, stdlib_corpus

RUN = dict(context_length=128, max_steps=6, save_steps=2, per_device_train_batch_size=1,
           gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=2, logging_steps=1, seed=7, max_blocks=8,
           gradient_checkpointing="false")
FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json", "config.json", "tokenizer.json", RUN_CONFIG)


def _args(ws: Path, out: Path, **overrides) -> list[str]:
    options = dict(RUN, model=ws / "base", data=ws / "corpus", output_dir=out)
    options.update(overrides)
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model, a corpus and the uninterrupted run every test compares with."""
    root = tmp_path_factory.mktemp("resume")
    save_tiny_model(root / "base", "llama")
    stdlib_corpus(root / "corpus", n_files=2)
    cmd_train(_args(root, root / "straight"))
    return root


def _summary(directory: Path) -> dict:
    summary = json.loads((directory / SUMMARY).read_text())
    summary.pop("seconds")  # wall time: the only field that may differ
    return summary


def _assert_same_result(out: Path, straight: Path) -> None:
    assert (out / "adapter_model.safetensors").read_bytes() == (straight / "adapter_model.safetensors").read_bytes()
    for name in FINAL_FILES:
        if name == RUN_CONFIG:  # the options, where only the output directory and `resume` may differ
            a, b = (yaml.safe_load((d / name).read_text()) for d in (out, straight))
            assert {**a, "output_dir": None, "resume": None} == {**b, "output_dir": None, "resume": None}
        else:  # adapter_config.json too: its module lists are sorted (PEFT's own order changes by process)
            assert (out / name).read_bytes() == (straight / name).read_bytes(), name
    assert _summary(out) == _summary(straight)
    assert _summary(out)["steps"] == RUN["max_steps"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(p.name for p in straight.glob("checkpoint-*"))
    assert not (out / ".staging").exists() and not (out / ".final.staging").exists()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_uninterrupted_run_logs_every_step_and_its_summary_covers_them(ws):
    summary = json.loads((ws / "straight" / SUMMARY).read_text())
    steps = [step for step, _ in summary["losses"]]
    assert steps == list(range(1, 7))
    assert summary["train_loss"] == pytest.approx(sum(loss for _, loss in summary["losses"]) / 6, rel=1e-12)
    # every checkpoint holds the summary of the run up to its step
    for step in (2, 4, 6):
        partial = json.loads((ws / "straight" / f"checkpoint-{step}" / SUMMARY).read_text())
        assert partial["steps"] == step and partial["losses"] == summary["losses"][:step]
    # the final output's weights are the last checkpoint's bytes
    assert (ws / "straight" / "adapter_model.safetensors").read_bytes() == (
        ws / "straight" / "checkpoint-6" / "adapter_model.safetensors").read_bytes()


def test_resume_auto_on_a_finished_run_changes_nothing(ws, tmp_path, capsys):
    out = tmp_path / "done"
    shutil.copytree(ws / "straight", out)
    before = _snapshot(out)
    result = cmd_train(_args(ws, out, resume="auto"))
    assert "already complete" in capsys.readouterr().out
    assert _snapshot(out) == before
    assert result.summary["steps"] == 6


def test_a_finished_checkpoint_becomes_the_final_output_without_training(ws, tmp_path, capsys, monkeypatch):
    """The state a kill between the last checkpoint and the end of the final save leaves."""
    out = tmp_path / "killed_before_final"
    shutil.copytree(ws / "straight", out)
    for name in (*FINAL_FILES, SUMMARY, "loss.png"):
        (out / name).unlink()
    import transformers

    def no_training(*args, **kwargs):
        raise AssertionError("a finished checkpoint must not be trained again")

    monkeypatch.setattr(transformers.Trainer, "train", no_training)
    cmd_train(_args(ws, out, resume="auto"))
    assert "saving it as the final output without training" in capsys.readouterr().out
    _assert_same_result(out, ws / "straight")


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_that_loads(ws, tmp_path, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(ws / "straight", out)
    for name in (*FINAL_FILES, SUMMARY):
        (out / name).unlink()
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated after its completion marker was written
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"")  # and the one before has lost its optimizer state
    cmd_train(_args(ws, out, resume="auto"))
    printed = capsys.readouterr().out
    assert "checkpoint-6 does not load (adapter_model.safetensors is truncated (5000 of" in printed
    assert "checkpoint-4 does not load (optimizer.pt is truncated or damaged (0 bytes))" in printed
    assert "falling back to checkpoint-2" in printed
    _assert_same_result(out, ws / "straight")  # steps 3-6 trained again give the same bytes


def test_a_checkpoint_beyond_max_steps_is_a_clear_error(ws, tmp_path):
    out = tmp_path / "beyond"
    shutil.copytree(ws / "straight", out)
    with pytest.raises(ValueError, match="checkpoint-6 is at step 6, beyond max_steps 4"):
        cmd_train(_args(ws, out, resume="auto", max_steps=4))


# --------------------------------------------------------------------------------------------------------------------
# SIGKILL at chosen moments, in a real process
# --------------------------------------------------------------------------------------------------------------------

def _killed_run(ws: Path, out: Path, moment: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **{KILL_ENV: moment})
    # the same intra-op thread count as this process: CPU reductions split by thread give other bits otherwise
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-m", "longlora.cli", "train", *_args(ws, out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, f"not killed at {moment} (exit {proc.returncode}): {proc.stderr[-3000:]}"


def _complete(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*") if (p / COMPLETE).exists())


MOMENTS = {
    # moment: what the kill leaves behind
    "mid-step-3": lambda out: _complete(out) == ["checkpoint-2"] and not (out / ".staging").exists(),
    "checkpoint-4-staging": lambda out: _complete(out) == ["checkpoint-2"]
    and not any((out / ".staging" / "checkpoint-4").iterdir()),
    "checkpoint-4-optimizer": lambda out: _complete(out) == ["checkpoint-2"]
    and (out / ".staging" / "checkpoint-4" / "optimizer.pt").is_file()
    and not (out / ".staging" / "checkpoint-4" / "trainer_state.json").exists(),
    "final-save": lambda out: _complete(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    and (out / ".final.staging").is_dir() and not (out / SUMMARY).exists(),
}


@pytest.mark.parametrize("moment", [
    "checkpoint-4-optimizer",
    pytest.param("mid-step-3", marks=pytest.mark.slow),
    pytest.param("checkpoint-4-staging", marks=pytest.mark.slow),
    pytest.param("final-save", marks=pytest.mark.slow),
])
def test_sigkill_then_resume_auto_gives_the_uninterrupted_result(ws, tmp_path, moment):
    out = tmp_path / "killed"
    _killed_run(ws, out, moment)
    assert MOMENTS[moment](out), sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    cmd_train(_args(ws, out, resume="auto"))
    _assert_same_result(out, ws / "straight")
    # and a further resume changes nothing
    before = _snapshot(out)
    cmd_train(_args(ws, out, resume="auto"))
    assert _snapshot(out) == before
