"""torchrun worker for tests/test_sequence_parallel.py: sharded loss/gradients vs one process on the whole sequence.

Every rank builds the same tiny model with LoRA+ (random nonzero adapters, so every trainable parameter gets a
gradient), computes the unsharded S2 loss and gradients itself (the reference, no communication), then its chunk's
share through longlora.sequence_parallel; gradients are summed over the ranks and rank 0 writes the largest
differences per case to the JSON file named on the command line.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from s2_reference import ReferenceKernel  # noqa: E402
from tiny_models import tiny_config  # noqa: E402

from longlora.sequence_parallel import halo  # noqa: E402
from longlora.attention import varlen as attention_varlen  # noqa: E402
from longlora.adapters import apply_lora_plus  # noqa: E402
from longlora.memory import apply_memory_plan  # noqa: E402
from longlora.attention import use_backend  # noqa: E402
from longlora.integration import enable_s2_attention  # noqa: E402
from longlora.sequence_parallel import (  # noqa: E402
    count_traffic, enable_sequence_parallel, sequence_parallel_loss, shard_batch,
)


def make_batch(layout: str, length: int, gen: torch.Generator) -> dict:
    """padding: two rows, one left- one right-padded; packed: one row of documents crossing chunk boundaries."""
    if layout == "packed":
        ids = torch.randint(3, 128, (1, length), generator=gen)
        lengths = [length // 4 - 3, length // 2 + 5, length - (length // 4 - 3) - (length // 2 + 5)]
        pos = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, L) restarting per document
        labels = ids.clone()
        labels[0, torch.tensor([0, lengths[0], lengths[0] + lengths[1]])] = -100  # a document's first token
        return {"input_ids": ids, "position_ids": pos, "labels": labels}
    b = 2 if layout in ("padding", "long_padding") else 1
    ids = torch.randint(3, 128, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    if layout == "padding":
        mask[0, :5] = 0  # left padding shifts every group of row 0
        mask[1, length - 7:] = 0
    if layout == "long_padding":  # more than a chunk: whole chunks of padding (N = 2, 4), left and right
        mask[0, :length // 2 + 3] = 0
        mask[1, length // 2 - 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(arch: str, seed: int, overrides: dict):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model = apply_lora_plus(model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at 0 (so would A's gradient): random adapters test every parameter
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.train()


def run_case(case: dict, rank: int, world: int) -> dict:
    model = build(case["arch"], case.get("seed", 0), case.get("config", {}))
    ref = copy.deepcopy(model)
    enable_s2_attention(ref, group_size=case["group_size"], shift=case.get("shift", True))
    gen = torch.Generator().manual_seed(100 + case.get("seed", 0))
    batch = make_batch(case["layout"], case["length"], gen)

    ref_loss = ref(**batch, use_cache=False).loss
    ref_loss.backward()

    enable_sequence_parallel(model, group_size=case["group_size"], shift=case.get("shift", True))
    if case.get("tiled_loss"):  # the chunked loss (chunks of 8 tokens) against the reference's full logits
        apply_memory_plan(model, tiled_loss=True, tiled_mlp=False, loss_chunk_tokens=8)
    shard = shard_batch(batch, model)
    # path: "auto" (CPU: the kernels' row prefix on regular batches), "sdpa" (the general [halo ; chunk] path for
    # any batch) or "varlen" (the CUDA path's code, its kernel replaced by the per-segment reference)
    path = case.get("path", "auto")
    kernel = ReferenceKernel()
    fetches = []
    fetch = halo._ChunkPrefix.fetch
    with count_traffic() as traffic, use_backend(path), contextlib.ExitStack() as stack:
        stack.callback(setattr, halo._ChunkPrefix, "fetch", fetch)
        halo._ChunkPrefix.fetch = lambda self, k, v: fetches.append(1) or fetch(self, k, v)
        if path == "varlen":
            stack.callback(setattr, attention_varlen, "KERNEL", attention_varlen.KERNEL)
            attention_varlen.KERNEL = kernel
        loss = sequence_parallel_loss(model, shard)
        loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    names, grads = [], []
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.clone()
            dist.all_reduce(g)  # the group's sum: the gradient of the whole sequence's loss
            names.append(name)
            grads.append((g, ref_grads[name].grad))
    sent = torch.tensor([sum(n for d, _, n in traffic if d == "fwd"), sum(n for d, _, n in traffic if d == "bwd"),
                         len(fetches), sum(c["window"] == (-1, -1) for c in kernel.forward_calls)])
    all_sent = [torch.zeros_like(sent) for _ in range(world)]
    dist.all_gather(all_sent, sent)
    plan = shard["sp_plan"]
    return {
        "case": case, "loss": float(total), "ref_loss": float(ref_loss),
        "loss_diff": abs(float(total) - float(ref_loss)),
        "max_grad_diff": max(float((g - r).abs().max()) for g, r in grads),
        "max_grad": max(float(r.abs().max()) for _, r in grads),
        "zero_ref_grads": [n for n, (_, r) in zip(names, grads) if float(r.abs().max()) == 0.0],
        "n_trainable": len(names),
        "halo": plan.halo, "chunk": plan.chunk,
        "bytes_sent": [s.tolist()[:2] for s in all_sent],
        "prefix_fetches": [int(s[2]) for s in all_sent],  # per rank: layers that took the row-prefix path
        "prefix_calls": [int(s[3]) for s in all_sent],  # per rank: varlen kernel calls over a prefix (halo)
    }


def run_cases(run, out_path: str, cases: list[dict]) -> None:
    """Run every case on every rank (torch.distributed initialised); rank 0 writes the results. A case that raises
    is reported in its row and ends the launch (a failed collective leaves the ranks out of step)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    results = []
    for case in cases:
        try:
            results.append(run(case, rank, world))
        except Exception as err:  # noqa: BLE001 - reported per case, the test names it
            import traceback

            traceback.print_exc()
            results.append({"case": case, "error": f"{type(err).__name__}: {err}"})
            break
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main():
    dist.init_process_group("gloo")
    run_cases(run_case, sys.argv[1], json.loads(sys.argv[2]))


if __name__ == "__main__":
    main()
