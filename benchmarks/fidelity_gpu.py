"""The paper's central claim at a scale where it can hold: a ~30M Llama extended 512 -> 2048 tokens on one GPU.

benchmarks/ablation.py reproduced Tables 2 and 6 on the 2.4M embedded model except the claim the method rests on:
there a model trained with S2-Attn is 6-10 % worse under full attention than one trained with full attention, while
the paper finds them equal (8.12 vs 8.08 at 7B). This script asks the same question of a base 12x larger, in one
GPU call of at most --budget-minutes (9) that it splits between its stages by measuring as it goes:

  1. corpus  the Python sources of the installed site-packages and standard library, split into train and held-out
             by file with the embedded model's rule (sha256 of the relative path, 1 in 20 held out), capped at
             --set corpus_mb; a byte-level BPE tokenizer (longlora.embedded.train_tokenizer) trained on the train
             split's first tokenizer_mb; both splits tokenised.
  2. base    a Llama (hidden 512, 8 layers, GQA 8/4 heads, vocab 8192: ~29M parameters) pretrained from scratch at
             512 tokens in bf16 with the embedded model's optimisers (Muon on the matrices, AdamW on embedding and
             norms, warm-up + cosine) for base_seconds of wall time; held-out perplexity at 512.
  3. rows    every row extends the base to 2048 tokens with linear PI x4 through `longlora train`'s own path
             (`run_training`; the blocks come from the tokens in memory, so no `datasets`), with the same data and
             steps; seeds 0 and 1 for the key rows. The steps are what the time left allows: a short probe run of
             the slowest row (full fine-tuning, full attention) measures one step and a run's fixed cost, the
             PI-only row's evaluation measures an evaluation, and the rest of the budget is divided.
             Each row is evaluated on the held-out files: perplexity at 512 and 2048 with full attention, at 2048
             with its own attention (S2 / short rows), and passkey retrieval at 2048 (PASSKEY_TEMPLATE).
  4. report  a table beside the paper's Table 2/6 numbers and the 2.4M miniature's (docs/benchmarks/ablation*.json),
             the claims as gaps in %, docs/benchmarks/fidelity_gpu.{json,png}. (Rows are also written to
             <output>.partial.json as they end, so a run stopped by a timeout keeps them; removed at the end.)

    python benchmarks/fidelity_gpu.py                       # the GPU run (one H100/H200, <= 9 minutes)
    python benchmarks/fidelity_gpu.py --smoke --output /tmp/f.json   # the CI version: tiny, CPU, about a minute
    python benchmarks/fidelity_gpu.py --device cpu --seeds 0 --set base_optimizer=adamw ...  # scaled down, as in
                                                                             # docs/benchmarks/RESULTS.md

Needs only torch, transformers, peft, accelerate, tokenizers, pyyaml and matplotlib (no `datasets`, no internet).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import site
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

STARTED = time.time()  # the budget counts from here: imports and CUDA start-up are part of the 9 minutes
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _extension import ROWS, load_row_model, plot_rows, row_perplexities, summarize, train_row  # noqa: E402

FIDELITY_ROWS = ("pi_only", "full_ft_full", "lora_plus_full", "lora_plus_s2", "lora_plus_short", "lora_full")
KEY_ROWS = ("lora_plus_full", "lora_plus_s2", "lora_plus_short")
"""Rows run with every seed: the three the claims (S2 vs full attention, shift vs no shift) rest on."""

PASSKEY_TEMPLATE = "paper"
"""Passkey prompt: 'paper' is the paper's natural-language filler (longlora.evaluate.passkey). A base pretrained on
Python has never read English; where `run_passkey` offers a code-shaped template (`template=`), name it here or with
--passkey-template."""

PAPER = dict(full_ft=8.08, lora_plus=8.12, lora=11.44, s2_full_eval=8.12, s2_own=8.64, short_full_eval=8.39,
             short_own=9.17)
"""Llama-2 7B extended to 32k, PG19 validation perplexity: Table 2 (S2-trained rows) and Table 6 (test with /
without full attention)."""

MINIATURES = {"2.4M, 100 steps": "ablation.json", "2.4M, 300 steps": "ablation_300steps.json"}
"""The embedded model's ablation runs (256 -> 1024), in docs/benchmarks/."""


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


# ------------------------------------------------------------------------------------------------------- stages


class Stages:
    """Elapsed time of each stage, printed as it ends and kept for the JSON."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                self.started = time.time()
                print(f"\n== stage {name} (at {self.started - STARTED:.0f}s)", flush=True)

            def __exit__(self, *exc):
                stages.seconds[name] = time.time() - self.started
                print(f"== stage {name}: {stages.seconds[name]:.1f}s (total {time.time() - STARTED:.0f}s)", flush=True)

        return _Stage()


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


# ------------------------------------------------------------------------------------------------------- report


def load_miniatures() -> dict[str, dict[str, dict]]:
    """{label: {row: summary entry}} of the embedded model's committed ablation runs (those present)."""
    found = {}
    for label, name in MINIATURES.items():
        path = ROOT / "docs" / "benchmarks" / name
        if path.is_file():
            found[label] = {s["row"]: s for s in json.loads(path.read_text())["summary"]}
    return found


def claims(by_row: dict[str, dict], target: int) -> dict[str, float | None]:
    """The comparisons the paper's claims rest on, as % perplexity gaps (positive: the first row is worse)."""
    full, own = f"ppl_{target}", f"ppl_{target}_trained_attention"

    def gap(a: str, b: str, key_a: str = full, key_b: str = full) -> float | None:
        if a not in by_row or b not in by_row:
            return None
        return 100.0 * (by_row[a][key_a] / by_row[b][key_b] - 1.0)

    return {
        "s2_vs_full_attention_training": gap("lora_plus_s2", "lora_plus_full"),
        "s2_vs_full_finetune": gap("lora_plus_s2", "full_ft_full"),
        "no_shift_vs_shift_full_eval": gap("lora_plus_short", "lora_plus_s2"),
        "no_shift_vs_shift_own_attention": gap("lora_plus_short", "lora_plus_s2", own, own),
        "s2_own_attention_vs_full_eval": gap("lora_plus_s2", "lora_plus_s2", own, full),
        "lora_vs_lora_plus": gap("lora_full", "lora_plus_full"),
        "lora_plus_vs_full_finetune": gap("lora_plus_full", "full_ft_full"),
        "pi_only_vs_lora_plus": gap("pi_only", "lora_plus_full"),
    }


def paper_claims() -> dict[str, float | None]:
    p = PAPER

    def gap(a: float, b: float) -> float:
        return 100.0 * (a / b - 1.0)

    # Table 2's rows are all S2-trained, so its full fine-tune (8.08) stands in for full-attention training
    return {
        "s2_vs_full_attention_training": gap(p["lora_plus"], p["full_ft"]),
        "s2_vs_full_finetune": gap(p["lora_plus"], p["full_ft"]),
        "no_shift_vs_shift_full_eval": gap(p["short_full_eval"], p["s2_full_eval"]),
        "no_shift_vs_shift_own_attention": gap(p["short_own"], p["s2_own"]),
        "s2_own_attention_vs_full_eval": gap(p["s2_own"], p["s2_full_eval"]),
        "lora_vs_lora_plus": gap(p["lora"], p["lora_plus"]),
        "lora_plus_vs_full_finetune": gap(p["lora_plus"], p["full_ft"]),
        "pi_only_vs_lora_plus": None,
    }


def print_claims(table: dict[str, dict[str, float | None]]) -> None:
    columns = list(table)
    print("\nclaims as perplexity gaps in % (first row named vs second; positive: the first is worse)")
    print(f"{'comparison':<34}" + "".join(f"{c:>18}" for c in columns))
    for name in table[columns[0]]:
        cells = [table[c].get(name) for c in columns]
        print(f"{name:<34}" + "".join(f"{'-':>18}" if v is None else f"{v:>+17.1f}%" for v in cells))


def readings(summary: list[dict], target: int) -> list[str]:
    """The two questions of the issue, answered mechanically from the numbers (seed spread included)."""
    by = {s["row"]: s for s in summary}
    full, own = f"ppl_{target}", f"ppl_{target}_trained_attention"
    out = []
    if "lora_plus_s2" in by and "lora_plus_full" in by:
        s2, ref = by["lora_plus_s2"], by["lora_plus_full"]
        g = 100.0 * (s2[full] / ref[full] - 1.0)
        out.append(f"LoRA+ + S2 under full attention vs LoRA+ trained with full attention: {s2[full]:.3f} vs "
                   f"{ref[full]:.3f} ({g:+.1f} %): the paper's claim (at most 2 % worse) "
                   f"{'holds' if g <= 2.0 else 'does NOT hold'} here "
                   f"(seed stdev {s2['stdev']:.3f} / {ref['stdev']:.3f})")
    if "lora_plus_s2" in by and "lora_plus_short" in by:
        s2, short = by["lora_plus_s2"], by["lora_plus_short"]
        for key, what in ((full, "full-attention eval"), (own, "own attention")):
            d = short[key] - s2[key]
            out.append(f"shift vs no shift ({what}): {s2[key]:.3f} vs {short[key]:.3f}: "
                       f"{'the shift' if d > 0 else 'no shift'} is better by {abs(d):.3f} "
                       f"({100.0 * abs(d) / max(s2[key], short[key]):.1f} %; seed stdev at full attention "
                       f"{s2['stdev']:.3f} / {short['stdev']:.3f})")
    return out


def plot(summary: list[dict], plan: Plan, base: dict, path: Path) -> None:
    title = (f"LongLoRA at {base['parameters'] / 1e6:.1f}M parameters: {plan.base_length} -> {plan.target} tokens "
             "(lower is better)")
    plot_rows(summary, [plan.base_length, plan.target], path, title=title,
              xlabel=f"held-out perplexity on Python sources (full-attention evaluation; base ppl@{plan.base_length} "
                     f"{base[f'heldout_ppl_{plan.base_length}']:.2f})")


# --------------------------------------------------------------------------------------------------------- main


def parse_plan(args) -> Plan:
    plan = SMOKE if args.smoke else GPU
    types = {f.name: f.type for f in fields(Plan)}
    changes = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"--set {item!r}: expected field=value with a field of: {', '.join(types)}")
        if name == "passkey_depths":
            changes[name] = tuple(float(v) for v in value.split(","))
        elif value.lower() == "none":
            changes[name] = None
        elif types[name] == "str":
            changes[name] = value
        elif "float" in str(types[name]):
            changes[name] = float(value)
        else:
            changes[name] = int(value)
    if args.steps is not None:
        changes["steps"] = args.steps
    try:
        return replace(plan, **changes)
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tiny CPU version (CI): every stage, in about a minute")
    p.add_argument("--rows", default=",".join(FIDELITY_ROWS))
    p.add_argument("--seeds", default="0,1", help="all of them for --key-rows, the first for the other rows")
    p.add_argument("--key-rows", default=",".join(KEY_ROWS))
    p.add_argument("--steps", type=int, default=None, help="extension steps of every row (default: fill the budget)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a Plan field, e.g. --set base_seconds=200 --set factor=8")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cuda | cpu")
    p.add_argument("--passkey-template", default=PASSKEY_TEMPLATE)
    p.add_argument("--work-dir", default="runs/fidelity_gpu")
    p.add_argument("--output", default="docs/benchmarks/fidelity_gpu.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the base pretraining")
    args = p.parse_args(argv)

    plan = parse_plan(args)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(FIDELITY_ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    key_rows = {r for r in args.key_rows.split(",") if r}

    import inspect

    import torch
    import transformers

    from longlora.evaluate.passkey import run_passkey
    from longlora.io import write_json

    if args.passkey_template != "paper" and "template" not in inspect.signature(run_passkey).parameters:
        p.error(f"--passkey-template {args.passkey_template}: this longlora's run_passkey has only the paper's prompt")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 evaluation: TF32 matrix products
        torch.backends.cudnn.allow_tf32 = True
    elif not args.smoke:
        print("note: no GPU; running the GPU plan on the CPU (use --set to scale it down)", flush=True)
    deadline = STARTED + plan.budget_minutes * 60
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    print(f"plan: {asdict(plan)}\ndevice: {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)

    with stages.run("corpus"):
        corpus = split_corpus(plan)
        tokenizer, stream, heldout = tokenize_corpus(corpus, plan)
        corpus_meta = dict(
            roots=[f"{label}: {root}" for label, root in source_roots()], files_found=corpus["files_found"],
            duplicates_skipped=corpus["duplicates_skipped"],
            train_files=len(corpus["train"]), heldout_files=len(corpus["heldout"]),
            train_mb=corpus["train_bytes"] / 2**20, heldout_mb=corpus["heldout_bytes"] / 2**20,
            train_tokens=len(stream), heldout_tokens=int(sum(len(d) for d in heldout)),
            heldout_docs_at_target=sum(len(d) >= plan.target for d in heldout),
        )
        del corpus
        print(f"corpus: {corpus_meta}", flush=True)

    base_dir = work / "base"
    with stages.run("base"):
        base = pretrain_base(plan, tokenizer, stream, heldout, base_dir, device, args.seed)

    def build_data(config, tokenizer):  # `run_training`'s data hook: the stream in memory
        return TokenBlocks(stream, config.context_length), None

    train_options = dict(per_device_train_batch_size=plan.row_batch, gradient_accumulation_steps=1,
                         learning_rate=plan.learning_rate, full_ft_learning_rate=plan.full_ft_learning_rate,
                         overwrite_output_dir=True, disable_tqdm=True, save_total_limit=1)
    runs = runs_of(rows, seeds, key_rows)
    trained_runs = [(r, s) for r, s in runs if ROWS[r][0] is not None]
    results, calibration = [], {}
    partial = Path(args.output).with_suffix(".partial.json")

    def keep(result: dict) -> None:  # each row as it ends: a run stopped by a timeout still leaves its rows
        results.append(result)
        write_json(partial, dict(plan=asdict(plan), corpus=corpus_meta, base=base, calibration=calibration,
                                 stages_seconds=dict(stages.seconds), results=results))
    with stages.run("rows"):
        first_eval = None
        for row, seed in [(r, s) for r, s in runs if ROWS[r][0] is None]:  # PI only: evaluation alone, timed
            started = time.time()
            model, tok = load_row_model(None, base_dir, None, plan.factor, device=str(device))
            measured = evaluate(model, tok, heldout, None, plan, row, args.passkey_template)
            del model
            first_eval = time.time() - started
            keep(dict(row=row, seed=seed, paper=ROWS[row][1], **measured, train_loss=None, steps=0,
                      train_seconds=0.0, seconds=first_eval))
            print(f"{row:<16} seed {seed}: {_line(measured, plan)} in {first_eval:.1f}s", flush=True)

        steps = plan.steps
        if steps is None and trained_runs:
            steps, calibration = calibrate(plan, trained_runs, base_dir, build_data, train_options, work, deadline,
                                           first_eval, device)
        for row, seed in trained_runs:
            options, paper = ROWS[row]
            started = time.time()
            run_dir = work / f"{row}-seed{seed}"
            summary = train_row(options, base=base_dir, output_dir=run_dir, data="python sources (in memory)",
                                target=plan.target, steps=steps, seed=seed, build_data=build_data, **train_options)
            train_seconds = time.time() - started
            model, tok = load_row_model(options, base_dir, run_dir, plan.factor, device=str(device))
            measured = evaluate(model, tok, heldout, options, plan, row, args.passkey_template)
            del model
            keep(dict(row=row, seed=seed, paper=paper, **measured, train_loss=summary["last_loss"],
                      steps=summary["steps"], train_seconds=train_seconds, seconds=time.time() - started))
            print(f"{row:<16} seed {seed}: {_line(measured, plan)}; trained {summary['steps']} steps in "
                  f"{train_seconds:.1f}s, total {time.time() - started:.1f}s (run at {time.time() - STARTED:.0f}s "
                  f"of {plan.budget_minutes * 60:.0f}s)", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    with stages.run("report"):
        report_started = time.time()
        lengths = [plan.base_length, plan.target]
        summary = summarize(results, lengths, extra=("passkey",))
        by_row = {s["row"]: s for s in summary}
        table = {"this run": claims(by_row, plan.target)}
        for label, mini in load_miniatures().items():
            table[label] = claims(mini, 1024)
        table["paper (7B, 32k)"] = paper_claims()
        print_claims(table)
        reading = readings(summary, plan.target)
        print("\n" + "\n".join(reading))
        out = Path(args.output)
        stages.seconds["report"] = time.time() - report_started  # up to the writing; the printed one includes it
        meta = dict(
            plan=asdict(plan), smoke=args.smoke, device=str(device),
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
            python=sys.version.split()[0], rows=rows, seeds=seeds, key_rows=sorted(key_rows), steps=steps,
            calibration=calibration, passkey_template=args.passkey_template, corpus=corpus_meta, base=base,
            lengths=lengths, flops_per_token_target=flops_per_token(plan, plan.target),
            stages_seconds=dict(stages.seconds), minutes=(time.time() - STARTED) / 60,
        )
        write_json(out, dict(meta=meta, results=results, summary=summary, claims=table, readings=reading))
        plot(summary, plan, base, out.with_suffix(".png"))
        partial.unlink(missing_ok=True)
    print("\nstages: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.seconds.items())
          + f"; total {(time.time() - STARTED) / 60:.2f} min (budget {plan.budget_minutes} min)")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _line(measured: dict, plan: Plan) -> str:
    t, b = plan.target, plan.base_length
    return (f"ppl@{t} {measured[f'ppl_{t}']:.3f} (ppl@{b} {measured[f'ppl_{b}']:.3f}, @{t} with its training "
            f"attention {measured[f'ppl_{t}_trained_attention']:.3f}), passkey@{t} {measured['passkey']:.2f}")


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


if __name__ == "__main__":
    main()
