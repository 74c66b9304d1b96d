"""A run's checkpoints: what makes one complete and self-contained, which one a run resumes from, what of it is the
final output.

A checkpoint-N directory is staged and renamed into place by the Trainer (train.py), and the completion marker
`COMPLETE` is written last: resume ignores checkpoints without it, and checks the ones with it for truncated or
missing files before trusting them (`checkpoint_problems`). `kill_point` is the crash-test hook tests/test_resume.py
uses to SIGKILL a run at each moment of a save.
"""

from __future__ import annotations

import json
import os
import signal
import zipfile
from pathlib import Path
from typing import Any

from .config import RUN_CONFIG, TrainConfig, save_config

SUMMARY = "train_summary.json"
COMPLETE = ".longlora_complete"
"""Marker written last into a checkpoint; resume ignores checkpoints without it."""
KILL_ENV = "LONGLORA_TEST_KILL"
"""Test hook (see `kill_point`): the moment at which a test wants this process SIGKILLed."""
# Files of a checkpoint that only resuming needs; the rest of it (weights, tokenizer, configs) is the final output.
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng_state", "trainer_state.json", "global_step", "latest",
               "zero_to_fp32.py", "zero_to_torch.py", "pytorch_model_fsdp", COMPLETE)


def kill_point(moment: str) -> None:
    """Crash-test hook, inert unless LONGLORA_TEST_KILL names `moment`: then this process SIGKILLs itself there.

    Moments: mid-step-N (step N's backward done, its optimizer step not), checkpoint-N-staging (checkpoint N's
    staging directory exists, nothing in it), checkpoint-N-optimizer (weights and optimizer.pt written, trainer
    state and completion marker not), final-save (the final output half moved into output_dir). tests/test_resume.py
    kills runs at each of them and checks that `--resume auto` finishes them exactly.
    """
    if os.environ.get(KILL_ENV) == moment:
        os.kill(os.getpid(), signal.SIGKILL)


def write_run_files(directory: str | Path, model, tokenizer, config: TrainConfig) -> None:
    """What makes a checkpoint (or the final output) self-contained: tokenizer, interpolated config, options."""
    from .modeling import finalize_saved_files, model_config

    tokenizer.save_pretrained(directory)
    if config.finetune != "full":
        # the base config *with* position interpolation: merge and eval read the trained context from it
        model_config(model).save_pretrained(directory)
    finalize_saved_files(directory)  # legacy RoPE keys for transformers 4.x readers, no junk tokenizer keys
    save_config(config, Path(directory) / RUN_CONFIG)


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N directory holding the completion marker (interrupted ones are skipped)."""
    found = complete_checkpoints(output_dir)
    return str(found[0]) if found else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N directories holding the completion marker, newest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    done = [p for p in out.glob("checkpoint-*") if p.is_dir() and (p / COMPLETE).exists()
            and p.name.split("-")[-1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def checkpoint_problems(checkpoint: str | Path) -> list[str]:
    """Why a checkpoint cannot be resumed from; empty when its files load.

    Cheap checks that catch truncated and missing files without reading the tensors: the trainer state parses, every
    safetensors file is exactly as long as its header says, every torch.save file (optimizer, scheduler, RNG state)
    is a readable zip archive (its index is written last), and the weights and the optimizer state are there.
    """
    directory = Path(checkpoint)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    problems = []
    try:
        int(json.loads((directory / "trainer_state.json").read_text())["global_step"])
    except FileNotFoundError:
        problems.append("trainer_state.json is missing")
    except (ValueError, KeyError, TypeError):
        problems.append("trainer_state.json is damaged")
    safetensors = sorted(directory.glob("*.safetensors"))
    if not safetensors and not any(directory.glob("*model*.bin")) and not any(directory.glob("global_step*")):
        problems.append("it holds no model weights (adapter_model.safetensors / model.safetensors)")
    problems += [p for p in map(_safetensors_problem, safetensors) if p]
    for index in directory.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{index.name} is damaged")
            continue
        problems += [f"{shard} (listed in {index.name}) is missing" for shard in sorted(shards)
                     if not (directory / shard).is_file()]
    if not any(directory.glob("optimizer*")) and not any(directory.glob("global_step*")):
        problems.append("optimizer.pt is missing")
    for f in sorted([*directory.glob("*.pt"), *directory.glob("*.pth"), *directory.glob("*.bin")]):
        try:
            with zipfile.ZipFile(f):
                pass
        except (zipfile.BadZipFile, OSError):
            problems.append(f"{f.name} is truncated or damaged ({f.stat().st_size} bytes)")
    return problems


def damaged_safetensors(paths) -> str | None:
    """The first problem of the .safetensors files among `paths` (files, or directories holding them), else None."""
    for path in map(Path, paths):
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] * (path.suffix == ".safetensors")
        for f in files:
            problem = _safetensors_problem(f)
            if problem:
                return f"{f.parent}/{problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > size - 8:
                return f"{path.name} is truncated ({size} bytes)"
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} has a damaged header"
    expected = 8 + header_len + end
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"{path.name} is damaged ({size} bytes, its header describes {expected})"
    return None


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def resume_from(config: TrainConfig) -> str | None:
    """The checkpoint to resume from: checked to load; with `auto`, the newest complete one that loads."""
    if not config.resume:
        return None
    if config.resume == "auto":
        found = complete_checkpoints(config.output_dir)
        if not found:
            print(f"resume auto: no complete checkpoint in {config.output_dir}; starting from scratch", flush=True)
            return None
        damaged = []
        for checkpoint in found:
            problems = checkpoint_problems(checkpoint)
            if not problems:
                if damaged:
                    print(f"resume auto: {'; '.join(damaged)}; falling back to {checkpoint.name}", flush=True)
                return str(checkpoint)
            damaged.append(f"{checkpoint.name} does not load ({', '.join(problems)})")
        more = f" (and {len(found) - 1} older one(s) do not either)" if len(found) > 1 else ""
        raise ValueError(
            f"resume auto: no checkpoint in {config.output_dir} loads: {damaged[0]}{more}. Remove the damaged "
            "checkpoint directories to start the run again, or choose another --output-dir"
        )
    if not Path(config.resume).is_dir():
        raise ValueError(f"resume: {config.resume} is not a directory; pass a checkpoint-N directory or --resume auto")
    if not (Path(config.resume) / COMPLETE).exists() and not Path(config.resume, "trainer_state.json").exists():
        raise ValueError(f"resume: {config.resume!r} is not a complete checkpoint directory")
    problems = checkpoint_problems(config.resume)
    if problems:
        raise ValueError(f"resume: {config.resume} does not load ({', '.join(problems)}); pass an older checkpoint "
                         "or --resume auto")
    return config.resume


def summary_of(directory: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(directory) / SUMMARY).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def final_files(checkpoint: Path) -> list[Path]:
    """What of a checkpoint makes the final output: all but the resume-only state (and the summary, written last)."""
    return sorted(p for p in checkpoint.iterdir() if p.name != SUMMARY and not p.name.startswith(RESUME_ONLY))
