"""The recipe of benchmarks/fidelity_gpu.py: its sizes (Plan), the corpus, the base's pretraining, one row's
evaluation and the calibration of the rows' steps to the time left.

Split from the program (which keeps the stages and the command line) and from the report (_fidelity_report.py) so
that each reads on its own; benchmarks/device.py's embedded_base stage reuses `pretrain_base` at the embedded
model's size. Imported by name: running a script puts benchmarks/ on sys.path.
"""

from __future__ import annotations

import hashlib
import math
import os
import site
import sysconfig
import time
from dataclasses import dataclass, fields
from pathlib import Path

from _extension import ROWS, row_perplexities, train_row


@dataclass(frozen=True)
class Plan:
    """Sizes of a run; `GPU` is the real one, `SMOKE` the CI one. `--set field=value` overrides any field."""

    vocab_size: int = 8192
    """BPE vocabulary, the two special tokens included."""
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_layers: int = 8
    num_heads: int = 8
    """Head dimension 64; S2 shifts half of the heads (paper section 3.2)."""
    num_kv_heads: int = 4
    base_length: int = 512
    """Pretraining context; the extension target is base_length x factor."""
    factor: int = 4
    """Linear PI factor: 4 -> 2048 tokens; 8 -> 4096 if the budget allows (check the stage times first)."""
    base_batch: int = 64
    """Sequences of base_length tokens per pretraining step (32k tokens)."""
    base_seconds: float = 180.0
    """Wall time of pretraining (the step count follows from the measured step time)."""
    base_steps: int | None = None
    """A fixed number of pretraining steps instead of base_seconds (the smoke run: deterministic)."""
    base_optimizer: str = "muon"
    """The embedded recipe's: 'muon' (Muon on the hidden matrices, AdamW on embedding and norms) or 'adamw' (for
    CPU runs, where Muon's Newton-Schulz products dominate a step; pair it with base_learning_rate=0.003)."""
    base_learning_rate: float = 0.02
    """AdamW peak rate of the embedding and norms: the embedded recipe's 0.06 at width 192, scaled by 192/512."""
    muon_learning_rate: float = 0.02
    warmup_steps: int = 20
    row_batch: int = 8
    """Blocks of target tokens per extension step (16k tokens at 2048)."""
    learning_rate: float = 2e-3
    """LoRA / LoRA+ rate (the miniature's)."""
    full_ft_learning_rate: float = 3e-4
    """Full fine-tuning rate (the miniature's: every weight moves, a smaller rate)."""
    steps: int | None = None
    """Extension steps of every row; None: fill the budget (probe, then divide the time left)."""
    probe_steps: int = 12
    min_steps: int = 50
    """Fewer steps than this is no extension: the run says the budget is too small and uses this many."""
    max_steps: int = 1000
    """The paper's step count: a faster GPU finishes early rather than train longer than the paper did."""
    budget_minutes: float = 9.0
    """The whole run, start-up included."""
    reserve_seconds: float = 20.0
    """Kept back at the end for the report and for steps that run slower than the probe's."""
    corpus_mb: float = 256.0
    """Train split cap, in MB of source, files taken in a fixed pseudo-random order."""
    heldout_mb: float = 16.0
    tokenizer_mb: float = 16.0
    """Train-split text the tokenizer is trained on."""
    max_file_kb: float = 512.0
    """Larger files (generated tables) are left out."""
    windows: int = 128
    """Held-out windows per length (non-overlapping; the same windows for every row)."""
    eval_batch: int = 16
    passkey_trials: int = 4
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        if self.factor < 2:
            raise ValueError(f"factor must be >= 2 (an extension), got {self.factor}")
        if self.base_optimizer not in ("muon", "adamw"):
            raise ValueError(f"base_optimizer must be 'muon' or 'adamw', got {self.base_optimizer!r}")
        if not self.passkey_depths or not all(0.0 <= d <= 1.0 for d in self.passkey_depths):
            raise ValueError(f"passkey_depths must be depths in [0, 1], got {self.passkey_depths}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")

    @property
    def target(self) -> int:
        return self.base_length * self.factor


GPU = Plan()
SMOKE = Plan(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, base_length=64,
    base_batch=8, base_steps=30, warmup_steps=5, row_batch=2, probe_steps=3, min_steps=2, max_steps=3,
    budget_minutes=30.0, corpus_mb=0.4, heldout_mb=0.15, tokenizer_mb=0.2, max_file_kb=64.0, windows=4, eval_batch=4,
    passkey_trials=1, passkey_depths=(0.5,),
)



# ------------------------------------------------------------------------------------------------------- corpus


def source_roots() -> list[tuple[str, Path]]:
    """(label, directory): the standard library, then each site-packages directory (label site-packages, -1, ...)."""
    from longlora.embedded import stdlib_root

    roots = [("stdlib", stdlib_root())]
    sites = list(dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"],
                                sysconfig.get_paths()["platlib"]]))
    for i, directory in enumerate(d for d in sites if Path(d).is_dir()):
        roots.append(("site-packages" if i == 0 else f"site-packages-{i}", Path(directory)))
    return roots


def python_sources(max_file_bytes: int) -> list[tuple[str, Path, int]]:
    """(key, path, bytes) of every .py file under `source_roots()`, key = '<label>/<relative path>'.

    The standard library is walked as the embedded model walks it (its EXCLUDED_DIRS: no site-packages, tests or
    separately packaged modules); site-packages skips tests and caches. Files above max_file_bytes are left out.
    """
    from longlora.embedded import EXCLUDED_DIRS

    site_excluded = EXCLUDED_DIRS - {"site-packages", "dist-packages"}
    found, seen = [], set()
    for label, root in source_roots():
        excluded = EXCLUDED_DIRS if label == "stdlib" else site_excluded
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d not in excluded and not d.startswith((".", "config-"))]
            for name in files:
                path = Path(directory) / name
                if not name.endswith(".py") or path in seen:
                    continue
                seen.add(path)
                try:
                    size = path.stat().st_size
                except OSError:  # a dangling link
                    continue
                if 0 < size <= max_file_bytes:
                    found.append((f"{label}/{path.relative_to(root).as_posix()}", path, size))
    return found


def _order(key: str) -> str:
    return hashlib.sha256(f"fidelity-order:{key}".encode()).hexdigest()


def split_corpus(plan: Plan) -> dict:
    """Train / held-out texts (held out: the embedded model's rule on the key), each capped in bytes.

    Files are taken in sha256 order of their key, so a cap keeps a sample of every package, the same on every
    machine with the same packages. A file whose bytes were already taken (vendored copies, the same module in two
    packages) is skipped, so no held-out text is also in the train split.
    """
    from longlora.embedded import _is_heldout

    files = sorted(python_sources(int(plan.max_file_kb * 1024)), key=lambda f: _order(f[0]))
    split: dict[str, list] = {"train": [], "heldout": []}
    caps = {"train": plan.corpus_mb * 2**20, "heldout": plan.heldout_mb * 2**20}
    used = {"train": 0, "heldout": 0}
    contents: set[bytes] = set()
    duplicates = 0
    for key, path, size in files:
        part = "heldout" if _is_heldout(key) else "train"
        if used[part] + size > caps[part]:
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).digest()
        if digest in contents:
            duplicates += 1
            continue
        contents.add(digest)
        split[part].append((key, data.decode("utf-8", errors="replace")))
        used[part] += size
    if not split["train"] or not split["heldout"]:
        raise RuntimeError(f"found {len(files)} Python source files: too few for a train and a held-out split")
    return dict(files_found=len(files), duplicates_skipped=duplicates, train=split["train"], heldout=split["heldout"],
                train_bytes=used["train"], heldout_bytes=used["heldout"])


def tokenize_corpus(corpus: dict, plan: Plan):
    """(tokenizer, train stream (N,) int64 with EOS after each file, held-out documents as int64 arrays with BOS)."""
    import numpy as np

    from longlora.embedded import _token_stream, train_tokenizer

    sample, size = [], 0
    for _, text in corpus["train"]:
        if size >= plan.tokenizer_mb * 2**20:
            break
        sample.append(text)
        size += len(text)
    tokenizer = train_tokenizer(sample, plan.vocab_size)
    stream = _token_stream(tokenizer, [text for _, text in corpus["train"]])  # (N,)
    bos = tokenizer.bos_token_id  # as `longlora eval` reads a directory: BOS, then the file
    heldout = [np.asarray([bos, *e.ids], dtype=np.int64)
               for e in tokenizer.backend_tokenizer.encode_batch([text for _, text in corpus["heldout"]])]
    return tokenizer, stream, heldout


class TokenBlocks:
    """The train stream cut into blocks of `length` tokens: `longlora train`'s concat packing, from memory."""

    def __init__(self, stream, length: int):
        self.blocks = stream[: len(stream) // length * length].view(-1, length)  # (num_blocks, length)
        if len(self.blocks) == 0:
            raise ValueError(f"the corpus ({len(stream)} tokens) holds no block of {length} tokens")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        ids = self.blocks[i]  # (length,)
        return {"input_ids": ids, "labels": ids.clone()}


# --------------------------------------------------------------------------------------------------------- base


def embedded_recipe(plan: Plan):
    """The embedded model's recipe (longlora.embedded.EmbeddedConfig) at this plan's size."""
    from longlora.embedded import EmbeddedConfig

    return EmbeddedConfig(
        vocab_size=plan.vocab_size, hidden_size=plan.hidden_size, intermediate_size=plan.intermediate_size,
        num_layers=plan.num_layers, num_heads=plan.num_heads, num_kv_heads=plan.num_kv_heads,
        context_length=plan.base_length, batch_size=plan.base_batch, steps=plan.base_steps or 1,
        learning_rate=plan.base_learning_rate, muon_learning_rate=plan.muon_learning_rate,
        warmup_steps=plan.warmup_steps, optimizer=plan.base_optimizer,
    )


def flops_per_token(plan: Plan, length: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x matrix parameters (LM head included) + causal attention."""
    head = plan.hidden_size // plan.num_heads
    per_layer = (plan.hidden_size * head * (2 * plan.num_heads + 2 * plan.num_kv_heads)
                 + 3 * plan.hidden_size * plan.intermediate_size)
    matrices = plan.num_layers * per_layer + plan.vocab_size * plan.hidden_size
    attention = plan.num_layers * 2 * length * plan.hidden_size  # QK^T and AV, half of the square (causal), x2 flops
    return 6 * matrices + 3 * attention


def pretrain_base(plan: Plan, tokenizer, stream, heldout, out: Path, device, seed: int) -> dict:
    """Pretrain the base for base_seconds (or base_steps) and save it with its tokenizer; returns its numbers."""
    import torch
    from transformers import LlamaForCausalLM

    from longlora.embedded import _lr_scale, _optimizers, model_config
    from longlora.evaluate.perplexity import evaluate_perplexity

    recipe = embedded_recipe(plan)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(recipe, tokenizer)).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"base: {params / 1e6:.1f}M parameters, {len(stream) / 1e6:.1f}M train tokens", flush=True)
    T, B = plan.base_length, plan.base_batch
    blocks = stream[: len(stream) // T * T].view(-1, T).to(device)  # (num_blocks, T)
    if len(blocks) < B:
        raise ValueError(f"the corpus holds {len(blocks)} blocks of {T} tokens, fewer than one batch of {B}")
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(blocks), generator=generator), 0
    optimizers = _optimizers(model, recipe)
    bf16 = device.type == "cuda"
    # steps: fixed, or what base_seconds allows at the step time measured after the first (compiling) steps
    unknown = 10**9  # until calibrated
    total = plan.base_steps or unknown
    timed_from, calibrate_at = 3, 13  # the first steps allocate and warm up: timed from the fourth
    losses, started, step = [], time.time(), 0
    model.train()
    while step < total:
        if step == timed_from:
            sync(device)
            t_timed = time.time()
        # calibrate after 10 timed steps, or sooner on a slow device (a fifth of the budget gone)
        slow = step > timed_from and time.time() - started > plan.base_seconds / 5
        if plan.base_steps is None and total == unknown and (step == calibrate_at or slow):
            sync(device)
            per_step = (time.time() - t_timed) / (step - timed_from)
            total = step + max(1, int((plan.base_seconds - (time.time() - started)) / per_step))
            print(f"base: {per_step * 1e3:.0f} ms/step -> {total} steps in {plan.base_seconds:.0f}s", flush=True)
        if cursor + B > len(order):  # next epoch: a fresh permutation
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor : cursor + B].to(device)]  # (B, T)
        cursor += B
        # before calibration the total is unknown: warm-up does not depend on it, the cosine is still ~1
        scale = _lr_scale(step, recipe, min(total, 10**6))
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 25 == 0 or step == total:
            losses.append((step, loss.item()))
            if not math.isfinite(losses[-1][1]):
                raise RuntimeError(f"pretraining diverged at step {step} (loss {losses[-1][1]}); lower "
                                   "--set base_learning_rate=... / muon_learning_rate=...")
            if step % 250 == 0 or step == total:
                print(f"base: step {step}/{total} loss {losses[-1][1]:.3f} ({time.time() - started:.0f}s)", flush=True)
    sync(device)
    seconds = time.time() - started
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ppl = evaluate_perplexity(model, tokenizer, heldout, [T], stride=T, max_windows=plan.windows,
                              batch_size=plan.eval_batch, progress=False)[0]["perplexity"]
    tokens = step * B * T
    print(f"base: {step} steps, {tokens / 1e6:.1f}M tokens ({tokens / len(stream):.2f} epochs) in {seconds:.0f}s, "
          f"{tokens / seconds / 1e3:.0f}k tokens/s; held-out ppl@{T} {ppl:.3f}", flush=True)
    return dict(parameters=params, steps=step, tokens=tokens, epochs=tokens / len(stream), seconds=seconds,
                tokens_per_second=tokens / seconds,
                tflops=flops_per_token(plan, T) * tokens / seconds / 1e12, loss_curve=losses,
                **{f"heldout_ppl_{T}": ppl})


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------- rows


def _step_times():
    """A TrainerCallback recording the wall time at the end of each optimiser step."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.time())

    return StepTimes()


def evaluate(model, tokenizer, heldout, options, plan: Plan, label: str, template: str) -> dict:
    """Held-out perplexities (full attention; own attention for S2 / short) and passkey accuracy at the target."""
    from longlora.evaluate.passkey import run_passkey

    ppl = row_perplexities(model, tokenizer, heldout, options, [plan.base_length, plan.target], windows=plan.windows,
                           batch_size=plan.eval_batch, label=label)
    extra = {} if template == "paper" else {"template": template}
    passkey = run_passkey(model, tokenizer, [plan.target], depths=plan.passkey_depths, trials=plan.passkey_trials,
                          seed=0, progress=False, **extra)
    return dict(ppl, passkey=passkey["accuracy"][str(plan.target)])


def runs_of(rows: list[str], seeds: list[int], key_rows: set[str]) -> list[tuple[str, int]]:
    return [(row, seed) for row in rows for seed in (seeds if row in key_rows else seeds[:1])]



def calibrate(plan: Plan, trained_runs, base_dir: Path, build_data, train_options: dict, work: Path,
              deadline: float, eval_seconds: float | None, device) -> tuple[int, dict]:
    """Steps per row that fill the time left: a probe run of the slowest row measures a step and a run's fixed
    cost (load, Trainer, save); an evaluation costs what the PI-only row's did (x1.5: S2 rows evaluate twice)."""
    probe = _step_times()
    started = time.time()
    train_row(ROWS["full_ft_full"][0], base=base_dir, output_dir=work / "probe", data="python sources (in memory)",
              target=plan.target, steps=plan.probe_steps, seed=0, build_data=build_data, callbacks=[probe],
              **train_options)
    probe_seconds = time.time() - started
    gaps = sorted(b - a for a, b in zip(probe.ends[1:], probe.ends[2:]))  # the first step compiles / warms up
    step_seconds = gaps[len(gaps) // 2] if gaps else probe_seconds / plan.probe_steps
    fixed = max(0.0, probe_seconds - plan.probe_steps * step_seconds)
    evaluation = 1.5 * (eval_seconds or 0.0)
    left = deadline - time.time() - plan.reserve_seconds
    n = len(trained_runs)
    fit = int((left - n * (fixed + evaluation)) / (n * step_seconds))
    steps = min(plan.max_steps, max(plan.min_steps, fit))
    info = dict(probe_steps=plan.probe_steps, probe_seconds=probe_seconds, step_seconds=step_seconds,
                fixed_seconds_per_run=fixed, eval_seconds_per_run=evaluation, seconds_left=left, runs=n,
                steps_that_fit=fit, steps=steps)
    print(f"calibration: {step_seconds * 1e3:.0f} ms/step (full FT at {plan.target}), {fixed:.1f}s fixed per run, "
          f"{evaluation:.1f}s evaluation; {left:.0f}s left for {n} runs -> {fit} steps fit, using {steps}", flush=True)
    if fit < plan.min_steps:
        print(f"WARNING: the budget fits only {fit} steps per row; running {plan.min_steps} (the run will overrun "
              f"--set budget_minutes={plan.budget_minutes}); shorten base_seconds or run fewer rows", flush=True)
    return steps, info
