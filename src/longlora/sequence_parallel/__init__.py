"""S2-aware sequence parallelism: one sequence split over N ranks, with only S2's halo exchanged.

A sequence of L tokens is cut into N contiguous chunks of C = L/N tokens, rank r holding [rC, (r+1)C). Everything
in a decoder layer but attention is per token. S2-Attn (half the heads in plain groups of G, half in groups shifted
by G/2, docs/method.md) lets a query see only keys of its own group, so a rank needs, per half of the heads, only the
keys/values of the groups its queries belong to that started on earlier ranks:
- C a multiple of G (chunks hold whole groups): the plain half needs nothing; the shifted half's one group that
  straddles the chunk start needs the previous rank's last G/2 keys/values of the shifted key/value heads.
- G a multiple of C (a group spans G/C ranks): a rank needs the chunks of the earlier ranks of its group, and only
  those (a causal gather inside the group, not a ring over all N ranks).
With padding or packed documents the groups move with each document's start; the same rule ("every key that a local
query's group holds before the chunk start") is computed from the global layout, so any layout is exact.

Point-to-point ops of torch.distributed (gloo on CPU, NCCL on GPU) move those keys/values forward and their
gradients back (`halo._fetch_halos`, `halo._return_halo_grads`). Two ways to attend:
- on CPU (any batch: regular, padded, packed) and on CUDA with torch's varlen kernels (regular batches): each row
  of the chunk is an S2 row whose first segment per head half continues the halo; the kernels' autograd Function
  (longlora.attention.cpu, longlora.attention.varlen) takes the halo as a row prefix (`halo._ChunkPrefix`), fetching it
  in its forward and returning its gradients in its backward: one output, no copies (per-rank memory = one
  process's / N + the halo);
- otherwise (padded or packed batches on CUDA, other backends): `halo._HaloExchange` builds [halo ; chunk] key/value
  windows and `halo._chunk_attention` runs s2_attention over the segments (global document x group) the chunk's queries
  share: no (C, C) mask, memory linear in the window, but copies of the windows and of the halo's query rows.

Library use (own training loop), on every rank of a process group holding the same full batch:

    enable_sequence_parallel(model, group, group_size=G)  # after LoRA, before the optimizer
    shard = shard_batch(batch, model)                      # this rank's chunk, global position ids, shifted labels
    loss = sequence_parallel_loss(model, shard)            # this rank's share: the group's sum = unsharded loss
    loss.backward()                                        # then all-reduce (sum) gradients over the group

`longlora train --sequence-parallel N` does the same inside the Trainer (`SequenceParallelTrainer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..adapters import base_model
from ..integration import S2Settings, set_attention
from .halo import (  # noqa: F401 - the chunk bookkeeping is this package's API too
    PLAN_KEY, SP_ATTENTION, SP_FORWARD, ChunkPlan, aligned_length, check_sequence_parallel, count_traffic,
    plan_chunks, register, valid_world_sizes,
)


# ----------------------------------------------------------------------------------------------------------------
# model and batch side


@dataclass
class SequenceParallelSettings:
    group: object
    """torch.distributed process group of the N ranks that share one sequence (None = the whole world)."""
    s2: S2Settings


def enable_sequence_parallel(model, group=None, group_size: int | None = None, group_size_ratio: float = 0.25, *,
                             shift: bool = True):
    """Switch a model (or PEFT model) to S2-Attn over a sequence sharded across `group`. Returns the model.

    Eval mode keeps full attention on one device (and unsharded training forwards run plain S2). group_size=None
    takes group_size_ratio x the *global* sequence length of each batch given to `shard_batch`.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence parallelism needs torch.distributed initialised (launch with torchrun)")
    settings = S2Settings(group_size=group_size, group_size_ratio=group_size_ratio, shift=shift, backend="auto")
    register()
    base = set_attention(model, SP_ATTENTION, settings)
    base._longlora_sequence_parallel = SequenceParallelSettings(group=group, s2=settings)
    for handle in getattr(base, "_longlora_sp_hooks", ()):
        handle.remove()

    def entering(module, args, kwargs):
        SP_FORWARD.set(kwargs.get(PLAN_KEY) is not None)

    def leaving(module, args, output):
        SP_FORWARD.set(False)

    base._longlora_sp_hooks = (base.register_forward_pre_hook(entering, with_kwargs=True),
                               base.register_forward_hook(leaving))
    return model


def _sp_settings(model) -> SequenceParallelSettings:
    settings = getattr(base_model(model), "_longlora_sequence_parallel", None)
    if settings is None:
        raise ValueError("call enable_sequence_parallel(model, group) before sharding batches for it")
    return settings


def shard_batch(batch: dict, model, *, rank: int | None = None, world: int | None = None) -> dict:
    """This rank's share of a full batch (identical on every rank of the group) for `sequence_parallel_loss`.

    batch: input_ids (B, L), optional attention_mask (B, L), position_ids (B or 1, L; restarting per packed
    document) and labels (B, L, unshifted as for the model). Returns input_ids / position_ids of the chunk (global
    positions, so RoPE sees the unsharded positions), `shift_labels` of the chunk (label of the next token, across
    the chunk boundary: the chunk's last token predicts the next chunk's first), the global count of scored tokens
    `num_items`, and the ChunkPlan under PLAN_KEY. With a fixed group size, a length that does not split into
    aligned chunks (SFT batches vary) is right-padded to the shortest one that does.
    """
    settings = _sp_settings(model)
    group = settings.group
    rank = dist.get_rank(group) if rank is None else rank
    world = dist.get_world_size(group) if world is None else world
    input_ids = batch["input_ids"]
    b, length = input_ids.shape
    mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    labels = batch.get("labels")
    if settings.s2.group_size is not None:
        padded = aligned_length(length, settings.s2.group_size, world)
        if padded > length:
            extra = padded - length
            mask = torch.ones_like(input_ids) if mask is None else mask
            input_ids, mask = F.pad(input_ids, (0, extra)), F.pad(mask, (0, extra))
            if position_ids is not None:  # the padding continues the last document (masked out anyway)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + torch.arange(
                    1, extra + 1, device=position_ids.device)], dim=1)
            labels = None if labels is None else F.pad(labels, (0, extra), value=-100)
            length = padded
    if mask is not None and bool(mask.bool().all()):
        mask = None
    g = settings.s2.group_size_for(length)
    plan = plan_chunks(mask, position_ids, b, length, g, world, rank, shift=settings.s2.shift, group=group,
                       device=input_ids.device)
    lo, hi = rank * plan.chunk, (rank + 1) * plan.chunk
    if position_ids is None:  # transformers' default: 0..L-1 whatever the padding
        position_ids = torch.arange(length, device=input_ids.device)[None]
    out = {"input_ids": input_ids[:, lo:hi], "position_ids": position_ids.expand(b, length)[:, lo:hi],
           PLAN_KEY: plan}
    if labels is not None:
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, L): token t predicts label t+1
        out["shift_labels"] = shifted[:, lo:hi]
        out["num_items"] = int((shifted != -100).sum())
    return out


def sequence_parallel_loss(model, shard: dict, scale: float = 1.0, num_items=None) -> torch.Tensor:
    """This rank's share of the mean token loss: sum of its tokens' losses / the group's token count (x `scale`).

    Summed over the group's ranks it equals the unsharded model's loss; so do the gradients, once summed over the
    group (pass scale=N when a data-parallel wrapper averages gradients over the group's ranks instead).
    `num_items` replaces the batch's own token count as the denominator (a count over several micro-batches).
    """
    count = shard["num_items"] if num_items is None else num_items
    count = count if torch.is_tensor(count) else max(count, 1)
    labels = shard["shift_labels"].contiguous()  # (B, C): already shifted across the chunk boundary
    # the model's own loss: its sum over the chunk's tokens / (count / scale); the chunked one (no (C, V) logits)
    # under a memory plan with tiled_loss (longlora.memory), else transformers' ForCausalLMLoss
    return model(input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=False, labels=labels,
                 shift_labels=labels, num_items_in_batch=count / scale, **{PLAN_KEY: shard[PLAN_KEY]}).loss


# ----------------------------------------------------------------------------------------------------------------
# Trainer: `longlora train --sequence-parallel N`


def data_parallel_groups(size: int):
    """Split the world into consecutive groups of `size` ranks; returns (this rank's group, its index, count).

    Every rank creates every group (torch.distributed requires it). The group is always a new one, even when it is
    the whole world, so that the halo exchange never interleaves with DDP's gradient all-reduce on one communicator.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"sequence_parallel={size} must divide the number of processes ({world}); launch a "
                         f"multiple of {size} processes (torchrun --nproc_per_node ...) or change sequence_parallel")
    mine = None
    for d in range(world // size):
        g = dist.new_group(list(range(d * size, (d + 1) * size)))
        if d == rank // size:
            mine = g
    return mine, rank // size, world // size


class SequenceParallelMixin:
    """Trainer behaviour for sequence parallelism over groups of N ranks (mixed into the project's Trainer).

    - data: the ranks of a group receive the same batches (the data-parallel split is over groups, not ranks);
    - loss: each rank runs its chunk (`shard_batch`). With the Trainer's token count over the step's micro-batches
      and all ranks (average_tokens_across_devices, the default; each group's tokens counted N times) a rank returns
      W x N x its tokens' loss sum / that count: DDP's average over the W ranks then gives the gradient of the
      step's mean token loss, as one process would, and the logged loss (mean over ranks) is that loss. Without
      the count: N x its share of each micro-batch's mean (micro-batches weigh equally).
    """

    sp_size: int = 1
    sp_index: int = 0
    sp_groups: int = 1


    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        shard = getattr(loader, "batch_sampler", None)
        if self.args.world_size > 1:
            if not hasattr(shard, "num_processes"):
                raise ValueError("sequence parallelism needs a map-style dataset (not streaming): set streaming false")
            shard.num_processes, shard.process_index = self.sp_groups, self.sp_index
        return loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        shard = shard_batch(inputs, self.accelerator.unwrap_model(model))  # the DDP/FSDP wrapper runs the forward
        step_count = num_items_in_batch is not None and self.args.average_tokens_across_devices
        # read by training_step right after: a loss over the step's count is already scaled for accumulation
        self.loss_is_scaled_for_ga = step_count
        if step_count:
            loss = sequence_parallel_loss(model, shard, scale=self.args.world_size * self.sp_size,
                                          num_items=num_items_in_batch)
        else:
            loss = sequence_parallel_loss(model, shard, scale=self.sp_size)
        return (loss, None) if return_outputs else loss


def setup_sequence_parallel(model, trainer_cls, size: int, group_size: int | None, group_size_ratio: float,
                            shift: bool = True):
    """Groups of `size` ranks, the model's attention switched to "s2_sp", and a Trainer class doing the rest."""
    group, index, count = data_parallel_groups(size)
    enable_sequence_parallel(model, group, group_size=group_size, group_size_ratio=group_size_ratio, shift=shift)
    print(f"sequence parallel: {count} group(s) of {size} ranks; this rank is {dist.get_rank(group)} of group "
          f"{index}", flush=True)
    return type("SequenceParallelTrainer", (SequenceParallelMixin, trainer_cls),
                {"sp_size": size, "sp_index": index, "sp_groups": count})
