"""The embedded default base model: a small Llama pretrained from scratch on the Python standard library.

A newcomer's first command must work on a laptop CPU with no download. So the project makes its own base model
on first use, from text every Python installation carries: the standard library's source files.

- Corpus: the stdlib's *.py files (tests, site-packages and modules that distributions package separately left
  out), sorted by relative path. About 5% of the files are held out for evaluation, chosen by a hash of the
  relative path only, so the split is the same on every machine with the same Python minor version.
- Tokenizer: byte-level BPE (4096 entries, `<|endoftext|>` as BOS/EOS, `<|pad|>`) trained on the train split.
- Model: a 4-layer Llama (2.4M parameters, hidden 192, 4 query / 2 key-value heads, RoPE theta 1e4, tied
  embeddings) pretrained at a context of 256 tokens for 300 steps of 16 x 256 tokens (0.6 epoch) with Muon on the
  attention/MLP matrices and AdamW on the embedding and norms, so that extending it to 1024 tokens (position
  interpolation x4 + LongLoRA) is a real, measurable task.

Measured on Python 3.11 (held-out split, 'window' protocol, stride 256): perplexity 43.3 at 256 tokens; at 1024
tokens 62.1 as is (positions never seen in training; 1.8x worse on the tokens past 512) and 56.5 with linear PI x4
and no training; after `longlora quickstart` (S2-Attn + LoRA+ + PI x4, 60 steps of 4 x 1024 tokens): the
README's quickstart table (its own, shorter evaluation: 40.2 at 1024 against 41.4 for the base at 256).
AdamW alone (best of 3e-3 / 6e-3 / 1e-2) reached only 142 at 256 with the same compute.

The recipe's result ships with the package (`longlora/embedded_base/`: float16 safetensors, 4.8 MB, and the
tokenizer), so a first run starts at once. `embedded_model_path()` returns that copy; `rebuild=True`
(`longlora quickstart --rebuild-base`) makes it again from the recipe into the cache (~15 minutes at 1 thread
on an idle AVX2 core, 892 s for the shipped build; needs torch >= 2.9 for Muon). `build_base_model(dir)` builds
one on demand and `ship_model` writes a build in the shipped form (`python -m longlora.embedded_shipping` does
both; longlora.embedded_shipping holds the shipped copy, the cache and `embedded_model_path`). Every write is
atomic: an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

from .io import replace_directory

EMBEDDED_VERSION = "1"
"""Bump when the recipe (corpus, tokenizer, model or training) changes: the cache directory is named after it."""

METADATA_FILE = "longlora_embedded.json"
"""Written last into a build: its presence marks a complete model."""

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

SPLITS = ("train", "heldout")
OPTIMIZERS = ("adamw", "muon")

# Directories (at any depth) never read: tests, third-party packages, generated tables and data, and packages that
# Linux distributions ship separately (idlelib, tkinter, distutils, lib2to3, ensurepip), which would make the corpus
# depend on what happens to be installed.
EXCLUDED_DIRS = frozenset(
    {
        "site-packages", "dist-packages", "__pycache__",
        "test", "tests", "idle_test",
        "encodings", "pydoc_data", "__phello__",
        "idlelib", "tkinter", "turtledemo", "distutils", "lib2to3", "ensurepip",
    }
)  # fmt: skip
HELDOUT_SALT = "longlora-heldout"
HELDOUT_MODULUS = 20
"""A file is held out when sha256(salt:relative_path) % 20 == 0: on 3.11, 19 of 387 files (111k tokens, 6 files
longer than 8k tokens)."""


# --------------------------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class EmbeddedConfig:
    """How the embedded model is made. The defaults are the shipped recipe; tests shrink them."""

    vocab_size: int = 4096
    """BPE vocabulary, special tokens included."""
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    """Grouped-query attention: 2 query heads share each key/value head."""
    context_length: int = 256
    """Pretraining context, and the model's max_position_embeddings."""
    rope_theta: float = 10000.0
    batch_size: int = 16
    """Sequences of `context_length` tokens per optimiser step."""
    steps: int = 300
    learning_rate: float = 0.06
    """Peak AdamW learning rate (of the embedding and norms with Muon; of everything with AdamW, where ~3e-3 fits).
    All learning rates warm up linearly and decay (cosine) to `min_lr_ratio` of their peak."""
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    """Applied to matrices only (not to norms; the tied embedding is a matrix and is decayed)."""
    grad_clip: float = 1.0
    optimizer: str = "muon"
    """'muon': Muon on the attention/MLP matrices, AdamW on the embedding and norms (held-out perplexity at 256
    after the default 300 steps: 44, versus 142 with AdamW alone at its best learning rate); or 'adamw'."""
    muon_learning_rate: float = 0.03
    threads: int | None = None
    """torch CPU threads during the build; None: `default_threads()` (the cores torch sees). The weights depend on
    it (reductions split across threads differently): the shipped build used 1 thread (held-out perplexity at 256:
    43.27); the same recipe on 2 threads gave 43.71."""
    max_train_files: int | None = None
    """Use only the first N training files (quick experiments and tests); None uses the whole train split."""
    heldout_windows: int = 512
    """At most this many held-out windows for the perplexity recorded in the metadata (all of them at 256)."""

    def __post_init__(self):
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "context_length", "batch_size", "steps",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 256 + 2 + 1:
            raise ValueError(f"vocab_size must be > 258 (256 bytes + 2 special tokens + merges), got {self.vocab_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dimension {self.hidden_size // self.num_heads} must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(f"weight_decay must be >= 0 and grad_clip > 0, got {self.weight_decay}, {self.grad_clip}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.max_train_files is not None and self.max_train_files < 1:
            raise ValueError(f"max_train_files must be >= 1 or None, got {self.max_train_files}")
        if self.heldout_windows < 1:
            raise ValueError(f"heldout_windows must be >= 1, got {self.heldout_windows}")


# --------------------------------------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    """The directory of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(relative_path: str) -> bool:
    digest = hashlib.sha256(f"{HELDOUT_SALT}:{relative_path}".encode()).hexdigest()
    return int(digest, 16) % HELDOUT_MODULUS == 0


def stdlib_split() -> tuple[list[str], list[str]]:
    """(train_paths, heldout_paths): the corpus files as sorted POSIX paths relative to `stdlib_root()`.

    Membership depends on the relative path alone, so it does not change with the machine, the install location
    or the patch release; the set of files is that of the Python minor version.
    """
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library sources are not at {root}; this Python ships no .py files")
    paths = []
    for directory, subdirs, files in os.walk(root):
        # prune in place: never descend into site-packages (thousands of files) or the other excluded trees
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        relative = Path(directory).relative_to(root)
        paths.extend((relative / name).as_posix() for name in files if name.endswith(".py"))
    paths.sort()
    train = [p for p in paths if not _is_heldout(p)]
    heldout = [p for p in paths if _is_heldout(p)]
    if not train or not heldout:
        raise FileNotFoundError(f"found only {len(paths)} standard library source files under {root}")
    return train, heldout


def stdlib_texts(split: str) -> list[str]:
    """The source texts of one split ('train' or 'heldout'), in `stdlib_split()` order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train, heldout = stdlib_split()
    root = stdlib_root()
    # The stdlib is UTF-8; `replace` keeps a patched distribution file from stopping the build.
    return [(root / p).read_bytes().decode("utf-8", errors="replace") for p in (train if split == "train" else heldout)]


def even_sample(items: list, limit: int | None) -> list:
    """Every k-th of `items`, at most `limit` of them (all for None): a short run still sees every part of the
    library."""
    if limit is None:
        return items
    return items[:: max(1, len(items) // limit)][:limit]


def write_stdlib_split(directory: str | os.PathLike, split: str, limit: int | None = None) -> Path:
    """One split as a directory of the stdlib's files (the corpus format `longlora train` and `eval` read), replacing
    `directory`. limit: an even sample of that many files (`even_sample`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train, heldout = stdlib_split()
    paths = even_sample(train if split == "train" else heldout, limit)
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    root = stdlib_root()
    for rel in paths:
        (directory / rel.replace("/", "__")).write_bytes((root / rel).read_bytes())
    return directory


def _corpus_fingerprint(paths: list[str], texts: list[str]) -> str:
    digest = hashlib.sha256()
    for path, text in zip(paths, texts):
        digest.update(path.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers PreTrainedTokenizerFast.

    Byte-level: any text (any byte) round-trips exactly, indentation included. `<|endoftext|>` (id 0) separates
    documents and serves as BOS/EOS; `<|pad|>` (id 1) pads. No token is added automatically.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def _token_stream(tokenizer, texts: list[str]):
    """All texts as one int64 tensor of ids, each document followed by EOS."""
    import numpy as np
    import torch

    eos = tokenizer.eos_token_id
    encoded = tokenizer.backend_tokenizer.encode_batch(texts)
    pieces = []
    for enc in encoded:
        pieces.append(np.asarray(enc.ids, dtype=np.int64))
        pieces.append(np.asarray([eos], dtype=np.int64))
    return torch.from_numpy(np.concatenate(pieces))


# ---------------------------------------------------------------------------------------------------------- model


def model_config(config: EmbeddedConfig, tokenizer):
    """The LlamaConfig of the embedded model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.context_length,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def default_threads() -> int:
    """The CPU threads torch uses by default (the cores it sees).

    Not derived from the load average: a momentary one at start-up would pin a whole run to one thread on a machine
    that is idle a minute later. Pass `threads` (`--threads`) to share a busy machine.
    """
    import torch

    return torch.get_num_threads()


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    """Use `threads` CPU threads inside the block (restored after): the build must not change the caller's setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else default_threads())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _lr_scale(step: int, config: EmbeddedConfig, total: int) -> float:
    """Learning-rate multiplier: linear warmup for `warmup_steps`, then cosine decay to `min_lr_ratio` at `total`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def _optimizers(model, config: EmbeddedConfig) -> list:
    """AdamW for everything, or Muon for the hidden matrices (attention and MLP) and AdamW for the rest."""
    import torch

    named = list(model.named_parameters())
    norms = [p for n, p in named if p.dim() < 2]  # RMSNorm weights: no weight decay
    if config.optimizer == "adamw":
        matrices = [p for n, p in named if p.dim() >= 2]
        groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": norms, "weight_decay": 0.0}]
        for group in groups:
            group["peak_lr"] = config.learning_rate
        return [torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)]
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(
            f"the embedded model's recipe uses torch.optim.Muon (torch >= 2.9), missing in torch {torch.__version__}; "
            "upgrade torch, or build with EmbeddedConfig(optimizer='adamw', learning_rate=3e-3) (a weaker model)"
        )
    hidden = [p for n, p in named if p.dim() >= 2 and ".layers." in n]  # q/k/v/o, gate/up/down
    embedding = [p for n, p in named if p.dim() >= 2 and ".layers." not in n]  # the (tied) token embedding
    adam_groups = [
        {"params": embedding, "weight_decay": config.weight_decay, "peak_lr": config.learning_rate},
        {"params": norms, "weight_decay": 0.0, "peak_lr": config.learning_rate},
    ]
    return [
        torch.optim.AdamW(adam_groups, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8),
        torch.optim.Muon(
            [{"params": hidden, "peak_lr": config.muon_learning_rate}],
            lr=config.muon_learning_rate,
            weight_decay=config.weight_decay,
            momentum=0.95,
            adjust_lr_fn="original",
        ),
    ]


def recipe_start(config: EmbeddedConfig, train_texts: list[str], seed: int = 0, device: str = "cpu"):
    """The recipe's first moves: its tokenizer trained on `train_texts`, their token stream, and the model
    initialised from `seed` on `device`. Returns (tokenizer, stream, model)."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(train_texts, config.vocab_size)
    stream = _token_stream(tokenizer, train_texts)  # (N,)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(config, tokenizer)).to(device)
    return tokenizer, stream, model


def _pretrain(model, stream, config: EmbeddedConfig, steps: int, seed: int, progress: bool,
              stop_after: int | None = None) -> list[float]:
    """Plain AdamW loop over shuffled, non-overlapping `context_length` blocks of the stream; returns the losses.
    stop_after: run only the first that many steps of the `steps`-step schedule (a check of a build's start)."""
    import torch
    from tqdm.auto import tqdm

    T, B = config.context_length, config.batch_size
    blocks = stream[: (len(stream) // T) * T].view(-1, T)  # (num_blocks, T)
    if len(blocks) < B:
        raise ValueError(f"the corpus holds {len(blocks)} blocks of {T} tokens, fewer than one batch of {B}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=generator)

    optimizers = _optimizers(model, config)
    model.train()
    losses, cursor = [], 0
    run = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(range(run), desc="pretraining the embedded model", unit="step", disable=not progress)
    for step in bar:
        if cursor + B > len(order):  # next epoch: a fresh permutation
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor : cursor + B]].to(model.device)  # (B, T)
        cursor += B
        scale = _lr_scale(step, config, steps)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def window_perplexity(model, documents: list, length: int, max_windows: int, batch_size: int = 16) -> float:
    """exp(mean window loss) over non-overlapping `length`-token windows inside each held-out document.

    At length 256 this is the project's 'window' perplexity protocol with stride 256 (every token scored).
    """
    import torch
    import torch.nn.functional as F

    windows = [doc[s : s + length] for doc in documents for s in range(0, len(doc) - length + 1, length)]
    windows = windows[:max_windows]
    if not windows:
        return float("nan")
    losses = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = torch.stack(windows[i : i + batch_size]).to(model.device)  # (b, length)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # (b, length-1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (b, length-1)
            losses.extend(nll.mean(dim=1).tolist())
    return math.exp(sum(losses) / len(losses))


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a build goes by default: `<cache_dir>/embedded-<version>`, cache_dir defaulting to $LONGLORA_CACHE, else
    ~/.cache/longlora."""
    if cache_dir is None:
        cache_dir = os.environ.get("LONGLORA_CACHE") or Path.home() / ".cache" / "longlora"
    return Path(cache_dir).expanduser() / f"embedded-{EMBEDDED_VERSION}"


# ---------------------------------------------------------------------------------------------------------- build


def build_base_model(
    output_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    config: EmbeddedConfig | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> Path:
    """Train the tokenizer and pretrain the embedded model; write it to `output_dir` and return that path.

    output_dir: where the model goes (config.json, model.safetensors, tokenizer files, longlora_embedded.json);
        None means the cache location `embedded_model_path()` uses. The build happens in a temporary directory
        beside it that replaces `output_dir` only when complete, so an interrupted build leaves nothing behind.
    steps: optimiser steps (default: the recipe's `config.steps`). config: the recipe (default EmbeddedConfig()).
    overwrite: replace an existing non-empty `output_dir` (always done for the default cache location).
    device: where the pretraining runs ("cuda": the recipe in seconds, other weights than a CPU build); the model
    is written from the CPU either way. Same seed, config, device and machine: the same weights.
    """
    import torch

    config = config or EmbeddedConfig()
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        config = replace(config, steps=steps)
    if output_dir is None:
        output_dir, overwrite = cache_path(), True
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a directory; choose another output directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; remove it, choose another directory or pass overwrite=True")
    output_dir.parent.mkdir(parents=True, exist_ok=True)

    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    try:
        with _torch_threads(config.threads) as threads:
            train_paths, heldout_paths = stdlib_split()
            train_texts, heldout_texts = stdlib_texts("train"), stdlib_texts("heldout")
            if config.max_train_files is not None:
                train_paths, train_texts = train_paths[: config.max_train_files], train_texts[: config.max_train_files]
            tokenizer, stream, model = recipe_start(config, train_texts, seed, device)
            losses = _pretrain(model, stream, config, config.steps, seed, progress)

            heldout_docs = [torch.tensor(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(heldout_texts)]
            heldout_ppl = window_perplexity(model, heldout_docs, config.context_length, config.heldout_windows)
            model = model.cpu()

        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tail = losses[-10:]
        metadata = {
            "name": f"longlora-embedded-{EMBEDDED_VERSION}",
            "version": EMBEDDED_VERSION,
            "description": "Llama-architecture model pretrained from scratch on the Python standard library's "
            "sources; base context of max_position_embeddings tokens",
            "corpus": {
                "source": "python-stdlib",
                "python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
                "stdlib_root": str(stdlib_root()),
                "excluded_dirs": sorted(EXCLUDED_DIRS),
                "split_rule": f"held out iff sha256('{HELDOUT_SALT}:' + relative_path) % {HELDOUT_MODULUS} == 0",
                "train_files": len(train_paths),
                "heldout_files": len(heldout_paths),
                "heldout_paths": heldout_paths,
                "train_tokens": int(len(stream)),
                "heldout_tokens": int(sum(len(d) for d in heldout_docs)),
                "fingerprint": _corpus_fingerprint(
                    train_paths + heldout_paths, train_texts + heldout_texts
                ),
            },
            "recipe": asdict(config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seed": seed,
            "steps": config.steps,
            "tokens_seen": config.steps * config.batch_size * config.context_length,
            "epochs": config.steps * config.batch_size * config.context_length / len(stream),
            "final_train_loss": sum(tail) / len(tail),
            "train_loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
            f"heldout_perplexity@{config.context_length}": heldout_ppl,
            "threads": threads,
            "device": str(torch.device(device)),
            "torch": torch.__version__,
            "build_seconds": round(time.time() - started, 1),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")  # last: marks a complete build
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp creates 0700, safetensors 0600: a shared cache is readable
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        replace_directory(tmp, output_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
