"""Checkpoints in host memory (`offload_checkpoints`): the input each checkpointed decoder layer keeps for its
recompute lives in (pinned) host memory between the forward and the backward.

On CUDA both copies run on a side stream, and the recompute of layer i prefetches layer i-1's input while layer i
is recomputed; on CPU the path is the same (and as exact), only nothing is saved. `check_host_memory` says before
training starts when the host cannot hold a step's checkpoints.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from .adapters import base_model


def checkpointed_layers(model) -> list[nn.Module]:
    """The decoder layers transformers' gradient checkpointing runs (GradientCheckpointingLayer instances)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in base_model(model).modules() if isinstance(m, GradientCheckpointingLayer)]


class HostOffloader:
    """saved_tensors_hooks that keep what they are given in host memory (pinned when it comes from CUDA).

    Installed around a layer's checkpoint call, they receive exactly the layer's saved inputs: torch's
    non-reentrant checkpoint saves its inputs under the hooks of the caller and its own recompute placeholders
    under its own, innermost, hooks. `host_bytes` counts the bytes held on the host now (benchmarks read it).
    """

    def __init__(self):
        self.host_bytes = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None  # the entry packed last: the next one's prefetch target

    def side_stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, tensor: torch.Tensor) -> "_HostCopy":
        entry = _HostCopy(tensor, self, self._last)
        self._last = weakref.ref(entry)
        return entry

    @staticmethod
    def unpack(entry: "_HostCopy") -> torch.Tensor:
        return entry.fetch()


class _HostCopy:
    """One tensor in host memory; `fetch` brings it back to its device (prefetching the entry packed before)."""

    def __init__(self, tensor: torch.Tensor, owner: HostOffloader, previous: weakref.ref | None):
        self.device = tensor.device
        self.owner = owner
        self.previous = previous
        self._back: torch.Tensor | None = None
        self._ready = None
        nbytes = tensor.numel() * tensor.element_size()
        owner.host_bytes += nbytes  # counted before the copy exists, so that a tracker never sees it twice
        weakref.finalize(self, _release, owner, nbytes)
        if tensor.is_cuda:
            stream = owner.side_stream(tensor.device)
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
            with torch.cuda.stream(stream):
                self.host.copy_(tensor.detach(), non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        else:  # a CPU model: nothing is saved, but the path (and its exactness) is the CUDA one
            self.host = tensor.detach().clone()

    def prefetch(self) -> None:
        if self._back is not None or not self.device.type == "cuda":
            return
        stream = self.owner.side_stream(self.device)
        with torch.cuda.stream(stream):
            self._back = self.host.to(self.device, non_blocking=True)
            self._ready = stream.record_event()

    def fetch(self) -> torch.Tensor:
        if self.device.type != "cuda":
            back = self.host.clone()
        else:
            self.prefetch()
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self._ready)
            back = self._back
            back.record_stream(current)
            self._back = None
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.prefetch()  # the layer before is recomputed next: its input crosses while this one runs
        return back


def _release(owner: HostOffloader, nbytes: int) -> None:
    owner.host_bytes -= nbytes


def install_offload(base: nn.Module, layers: list[nn.Module], offloader: HostOffloader):
    """Run each layer's checkpoint function under the offloader's saved-tensor hooks; returns the undo function.

    The hooks must be entered outside the checkpoint call, where it saves the layer's inputs: transformers before
    5.23 checkpoints the whole `__call__` (the layer's own forward hooks run inside the checkpoint, where they would
    see every activation), later releases checkpoint `forward`. Both call the layer's `_gradient_checkpointing_func`,
    so that is what is wrapped; a forward pre-hook on the model wraps it again should `gradient_checkpointing_enable`
    (the Trainer calls it) have set a new one since.
    """

    def offloading(checkpoint_func):
        def run(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
                return checkpoint_func(*args, **kwargs)

        run.unwrapped = checkpoint_func
        return run

    def wrap(*_):
        for layer in layers:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if func is not None and getattr(func, "unwrapped", None) is None:
                layer._gradient_checkpointing_func = offloading(func)

    def unwrap():
        handle.remove()
        for layer in layers:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if getattr(func, "unwrapped", None) is not None:
                layer._gradient_checkpointing_func = func.unwrapped

    wrap()
    handle = base.register_forward_pre_hook(wrap)
    return unwrap


def offload_host_bytes(config, tokens: int, itemsize: int) -> int:
    """Host memory the offloaded checkpoints of one micro-batch of `tokens` tokens take: one hidden state per layer."""
    text = config.get_text_config()
    return int(text.num_hidden_layers * tokens * text.hidden_size * itemsize)


def available_host_memory() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable; else physical pages available), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_memory(config, tokens: int, itemsize: int, available: int | None = None) -> int:
    """The host bytes offloading needs; a ValueError saying so when this machine has less available."""
    need = offload_host_bytes(config, tokens, itemsize)
    available = available_host_memory() if available is None else available
    if available is not None and need > available:
        text = config.get_text_config()
        raise ValueError(
            f"offload_checkpoints keeps {need / 2**30:.1f} GiB of checkpoints in host memory ({text.num_hidden_layers} "
            f"layers x {tokens} tokens x hidden {text.hidden_size} x {itemsize} bytes), but this machine has "
            f"{available / 2**30:.1f} GiB available; shorten the context, lower the batch, or set offload_checkpoints "
            "false")
    return need
