"""Sequence parallelism composed with a parameter-sharding wrapper: FSDP (torch FSDP2 and FSDP1) and DeepSpeed ZeRO-2/3.

Library level (tests/sp_compose_worker.py under torchrun, gloo on CPU): the wrapper shards the parameters over the
whole world and averages gradients over it; groups of N ranks share a sequence. Loss, every trainable gradient and the
weights after clipped optimizer steps equal one process on all groups' sequences, to fp32 rounding.
Trainer level: `longlora train --sequence-parallel 2 --deepspeed configs/deepspeed/zero{2,3}.json` trains the adapter
of one process. (FSDP cannot be tested through the Trainer on CPU: accelerate enables its FSDP plugin only for
accelerator device types; a CPU launch with --fsdp silently trains with DDP.)
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import cpu_env, torchrun

HERE = Path(__file__).parent
ROOT = HERE.parent
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed: pip install -e '.[deepspeed]'")
linux = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")


def _env() -> dict:
    # DS_ACCELERATOR: DeepSpeed's CPU accelerator even where a GPU is visible (these runs are gloo, CPU tensors).
    # TORCH_EXTENSIONS_DIR: DeepSpeed JIT-builds its CPU communication op under a lock file; in the shared
    # ~/.cache/torch_extensions a build killed halfway leaves that lock behind and every later launch waits on it
    # forever, so the build goes next to this checkout's environment (one build per checkout, ~30 s).
    extensions = ROOT / ".venv" / "torch_extensions" if (ROOT / ".venv").is_dir() else None
    return cpu_env(DS_ACCELERATOR="cpu", **({"TORCH_EXTENSIONS_DIR": str(extensions)} if extensions else {}))


def _launch(world: int, cases: list[dict], tmp_path) -> list[dict]:
    out = tmp_path / f"compose{world}.json"
    torchrun(world, [HERE / "sp_compose_worker.py", out, json.dumps(cases)], env=_env())
    return json.loads(out.read_text())


def _check(results: list[dict], cases: list[dict]) -> None:
    assert [r["case"] for r in results] == cases  # every case ran (a failing case stops the launch)
    for r in results:
        case = r["case"]
        assert "error" not in r, r
        assert r["n_trainable"] > 10
        assert r["groups"] == case["world"] // case["sp"]
        assert max(r["ref_grad_norms"]) > 0.5  # the clipping (max norm 0.5) acted on at least one step
        assert r["loss_diff"] <= 2e-6 * max(1.0, max(r["ref_losses"])), (case, r["losses"], r["ref_losses"])
        assert r["max_grad_diff"] <= 1e-6 * max(1.0, r["max_grad"]), (case, r["max_grad_diff"])
        # every trainable tensor moved, and to the reference's weights
        assert r["min_weight_moved"] > 1e-6, case
        assert r["max_weight_diff"] <= 1e-6, (case, r["max_weight_diff"])
    print("; ".join(f"{r['case']['wrap']} N={r['case']['sp']} x {r['groups']} group(s): |grad diff| "
                    f"{r['max_grad_diff']:.1e}, |weight diff| {r['max_weight_diff']:.1e}" for r in results))


def _cases(wraps: list[str], world: int) -> list[dict]:
    """Both regimes (chunks >= G: halo only; chunks < G: a group spans ranks), padding and packed documents,
    gradient checkpointing (the halo exchange recomputed in the backward); with 4 ranks also 2 groups x 2."""
    cases = []
    for wrap in wraps:
        if world == 2:
            cases += [
                {"wrap": wrap, "sp": 2, "arch": "llama", "layout": "padding", "length": 64, "group_size": 16},
                {"wrap": wrap, "sp": 2, "arch": "qwen2", "layout": "packed", "length": 64, "group_size": 64,
                 "checkpointing": True},
            ]
        else:
            cases += [
                {"wrap": wrap, "sp": 2, "arch": "llama", "layout": "packed", "length": 64, "group_size": 16,
                 "checkpointing": True},
                {"wrap": wrap, "sp": 4, "arch": "qwen2", "layout": "padding", "length": 64, "group_size": 32},
            ]
    for c in cases:
        c.update(world=world, steps=2)
    return cases


@linux
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_with_sequence_parallel_equals_one_process(world, tmp_path):
    cases = _cases(["fsdp2", "fsdp1"], world)
    _check(_launch(world, cases, tmp_path), cases)


@linux
@needs_deepspeed
@pytest.mark.parametrize("world", [2, 4])
def test_deepspeed_zero_with_sequence_parallel_equals_one_process(world, tmp_path):
    cases = _cases(["zero2", "zero3"], world)
    _check(_launch(world, cases, tmp_path), cases)


# ------------------------------------------------------------------------------------------------------------------
# Trainer level: `longlora train --sequence-parallel 2 --deepspeed ...`

_OPTIONS = dict(context_length=256, max_steps=2, save_steps=100, learning_rate=3e-3, warmup_steps=0, logging_steps=1,
                seed=7, max_blocks=2, packing="documents")


def _args(tmp_path, out, **extra) -> list[str]:
    options = dict(_OPTIONS, model=tmp_path / "base", data=tmp_path / "corpus", output_dir=out, **extra)
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """One process, whole sequences, both blocks in every step's batch (on CPU, as the sharded runs)."""
    from tiny_models import save_tiny_model, stdlib_corpus

    tmp_path = tmp_path_factory.mktemp("compose_train")
    save_tiny_model(tmp_path / "base", "llama")
    stdlib_corpus(tmp_path / "corpus", n_files=2)
    cmd = [sys.executable, "-m", "longlora.cli", "train"] + _args(
        tmp_path, tmp_path / "one", per_device_train_batch_size=2, gradient_accumulation_steps=1)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp_path


@linux
@needs_deepspeed
@pytest.mark.parametrize("stage,nproc,resume", [(2, 2, False), (3, 2, True), (3, 4, False)])
def test_train_with_deepspeed_and_sequence_parallel_gives_the_same_adapter(one_process_run, stage, nproc, resume,
                                                                          tmp_path):
    """2 processes: one group, the two blocks as two accumulated micro-batches (DeepSpeed's own accumulation
    scaling is off: the loss is over the step's token count); with ZeRO-3, one step, then `--resume auto` from its
    checkpoint (the partitioned optimizer state) for the second. 4 processes: two groups, one block each."""
    from safetensors.torch import load_file

    from longlora.checkpoints import COMPLETE

    base = one_process_run
    out = tmp_path / f"zero{stage}"
    groups = nproc // 2

    def launch(**extra):
        return torchrun(nproc, ["-m", "longlora.cli", "train"] + _args(
            base, out, sequence_parallel=2, ddp_backend="gloo", per_device_train_batch_size=1,
            gradient_accumulation_steps=2 // groups, deepspeed=ROOT / "configs" / "deepspeed" / f"zero{stage}.json",
            **extra), env=_env())

    if resume:
        launch(max_steps=1, save_steps=1)
        assert (out / "checkpoint-1" / "global_step1").is_dir() and (out / "checkpoint-1" / COMPLETE).exists()
    proc = launch(**({"resume": "auto"} if resume else {}))
    assert "starting from scratch" not in proc.stdout  # a resumed run continues from checkpoint-1
    assert f"sequence parallel: {groups} group(s) of 2 ranks" in proc.stdout
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # the DeepSpeed engine's (ZeRO-partitioned) state
    a = load_file(base / "one" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-4)
    one = json.loads((base / "one" / "train_summary.json").read_text())["losses"]
    two = json.loads((out / "train_summary.json").read_text())["losses"]
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
