"""Timing and peak-memory tools shared by the benchmark scripts (imported as `_measure`: a script's own folder is
first on sys.path when it runs as `python benchmarks/<script>.py`).

Peak memory: CUDA's allocator peak on GPU; on CPU, the peak of bytes held by tensors, tracked by a TorchDispatchMode
that counts every tensor allocated (inputs excluded) until its storage is freed.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SMOKE_DIR = Path(tempfile.gettempdir()) / "longlora-smoke"
"""Where a --smoke run writes when given no --output: docs/benchmarks/ holds the real (GPU) runs' results only."""


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the mode (CPU-friendly stand-in for max_memory_allocated)."""

    def __init__(self, exclude: tuple[torch.Tensor, ...] = (), offloaded=None):
        super().__init__()
        self.live = 0
        self.peak = 0
        # offloaded() -> bytes of the live tensors that stand for host memory (longlora.memory's offloaded
        # checkpoints): they are not counted in the peak
        self._offloaded = offloaded or (lambda: 0)
        self.phases: dict[str, int] = {}
        self._phase_peak = 0
        # storages of the inputs: views of them (a transpose, a slice) are not new memory
        self._seen: set[int] = {t.untyped_storage().data_ptr() for t in exclude}

    def mark(self, phase: str) -> None:
        """Close a phase: `phases[phase]` = the peak since the previous mark; the next phase starts at the bytes live
        now. `peak` stays the peak of the whole run."""
        self.phases[phase] = self._phase_peak
        self._phase_peak = self.live - self._offloaded()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        held = self.live - self._offloaded()
        self.peak = max(self.peak, held)
        self._phase_peak = max(self._phase_peak, held)

        def release(_ref, key=key, size=size):
            self._seen.discard(key)
            self.live -= size

        weakref.finalize(storage, release, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage (a view, an in-place op) allocated nothing, also when that storage
        # predates the mode (a view of a parameter or of the batch is not new memory)
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out


def make_inputs(length, heads, kv_heads, head_dim, device, dtype, seed=0, batch=1):
    """Random q/k/v in the model's layout: (B, L, H, D) projections transposed to (B, H, L, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, head_dim, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, length, kv_heads, head_dim, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(batch, length, kv_heads, head_dim, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
    return q, k, v


def full_attention(q, k, v):
    """Full causal SDPA, GQA without repeating K/V: the baseline every table compares against."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def measure(fn, q, k, v, repeats, keep_output=False):
    """Median fwd+bwd seconds and peak memory (bytes) of fn(q, k, v).sum().backward().

    As in a model (the attention output feeds o_proj and is not kept), nothing holds the output during backward,
    unless keep_output: then the caller keeps it, which stops S2 from writing dq over its saved output.
    """

    def step():
        if keep_output:
            kept = fn(q, k, v)
            kept.float().sum().backward()
            del kept
        else:
            fn(q, k, v).float().sum().backward()
        q.grad = k.grad = v.grad = None

    return time_and_peak(step, q.device, repeats, exclude=(q, k, v))


def peak_only(fn, q, k, v, keep_output=False):
    """Peak memory (bytes) of one fwd+bwd of fn (no timing)."""
    return measure(fn, q, k, v, 0, keep_output)[1]


def time_and_peak(step, device, repeats, exclude=(), warmup=1):
    """Median seconds of `step()` over `repeats` runs after `warmup` runs, and the peak bytes of one more run."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    _, peak = timed_peak(step, device, exclude)
    return (sorted(times)[len(times) // 2] if times else float("nan")), peak


def timed_peak(step, device, exclude=()):
    """Seconds and peak bytes of one run of `step()` (both from the same run: for steps too long to run twice).
    exclude: tensors the CPU count leaves out (the inputs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    with PeakTensorMemory(exclude=exclude) as tracker:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    return seconds, tracker.peak


def src_env(**extra) -> dict:
    """The environment for a subprocess that imports this checkout's longlora (src/ first on PYTHONPATH: the device
    has the tree, not an installed package), plus `extra` variables."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                **extra)


def group_size_for(length: int, ratio: float = 0.25) -> int:
    """The group size the library uses for a length (ratio x L, even)."""
    from longlora.attention import group_size_from_ratio

    return group_size_from_ratio(length, ratio)


def add_shape_arguments(parser, lengths: str) -> None:
    """The options every op benchmark shares: lengths, attention shape, group ratio, device, dtype."""
    parser.add_argument("--lengths", default=lengths)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--group-ratio", type=float, default=0.25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from longlora.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --- where results go, and what they were measured on ------------------------------------------------------------


def in_docs(path) -> bool:
    """Whether `path` lies under the repository's docs/ (the committed results)."""
    return Path(path).resolve().is_relative_to(DOCS.resolve())


def output_path(parser, output, smoke: bool, name: str) -> Path:
    """A benchmark's JSON path: `output` if given, else docs/benchmarks/<name> for a real run and
    SMOKE_DIR/<name> for a --smoke run. A tiny CPU smoke run never writes into docs/, where a GPU result belongs:
    an explicit --output there is refused (parser.error, exit status 2)."""
    if output is None:
        return SMOKE_DIR / name if smoke else DOCS / "benchmarks" / name
    if smoke and in_docs(output):
        parser.error(f"--smoke writes a tiny run: pass --output outside docs/ (got {output})")
    return Path(output)


def git_commit() -> str | None:
    """The repository's HEAD commit (with '-dirty' when tracked files differ from it); outside a checkout (the device
    machine gets a copy of the working tree without .git) $LONGLORA_COMMIT, which the device command sets; else None."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LONGLORA_COMMIT") or None


def device_meta(device: torch.device) -> dict:
    """What a result was measured on: device name, torch / transformers / CUDA versions, the commit. `cuda` is True
    only for a run on a CUDA device: the mark of a result that may stand in docs/benchmarks/."""
    import transformers

    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    meta = {"device": name, "cuda": cuda, "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_version": torch.version.cuda, "python": sys.version.split()[0], "commit": git_commit()}
    if cuda:
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return meta
