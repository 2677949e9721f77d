"""Training on several processes started by `torchrun` (one per GPU, on one machine or many).

Every rank draws the random numbers of the whole global batch (noise, noise levels, captions, dropped
frames) from the same seeded generators and keeps its own rows, so N ranks with batch_size B train
exactly what one process with batch size N·B would. Gradients are summed across ranks with each rank's
loss weighted by its share of the global batch, which stays exact when a batch does not split evenly.

- LoRA and embeddings: the trainable parameters are replicated; only their gradients cross the network,
  in one flat all-reduce per optimizer step (the frozen model never does). This is DDP's data
  parallelism without its module wrapper, which would hang when a WAN 2.2 expert gets no sample on one
  rank in a step.
- Fine-tune: the transformer is sharded with FSDP2 (`fully_shard`, one unit per block), so weights,
  gradients and optimizer state are split N ways; saves gather a full copy on rank 0.

NCCL on CUDA, gloo on the CPU. Only rank 0 logs, samples to disk and saves.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..util.ranks import Ranks, is_sharded  # noqa: F401  (is_sharded: callers use distributed.is_sharded)

log = logging.getLogger("motiontune")


class WorldSizeError(ConfigError):
    """The number of processes and the batch settings cannot divide the data."""


def start(device: torch.device, sharded: bool, split_experts: bool = False, context=None) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT); a plain `motiontune train` is a world of one. `sharded`: the method shards the
    transformer with FSDP2 (a fine-tune). `split_experts`: `experts_on: split`, each expert on half the
    ranks (place_experts); a fine-tune then runs one rank per expert, unsharded. `context`: the config's
    `context_parallel` (groups of `degree` consecutive ranks share each clip's tokens)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    degree = context.degree if context is not None else 1
    if degree > 1 and world_size % degree:
        raise WorldSizeError(f"context_parallel.degree = {degree} but this run has {world_size} process(es): the processes "
                             f"form groups of {degree} that share each clip, so start a multiple of {degree} "
                             f"(torchrun --nproc-per-node {degree}, or {2 * degree} for two data-parallel groups)")
    if split_experts and world_size < 2:
        raise WorldSizeError("experts_on = split puts WAN 2.2 A14B's two experts on two groups of processes, but this run "
                             "has one process. Start it with torchrun --nproc-per-node 2 (or more, an even count), "
                             "or set experts_on to together")
    sharded = sharded and not split_experts
    if world_size <= 1:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))  # cache filling can take long
    ranks = Ranks(rank, world_size, local_rank, sharded=sharded, context=degree)
    if degree > 1:
        ranks.context_mesh = _context_mesh(device, world_size, degree, context.attention)
    if not ranks.main:  # rank 0 reports; the others speak up only for their own warnings and errors
        log.setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    if ranks.main and degree > 1:
        log.info("%d processes (%s): %d data-parallel group(s) of %d sharing each clip's tokens (context parallel, %s "
                 "attention); trained parameters replicated, gradients summed", world_size, dist.get_backend(),
                 ranks.data_size, degree, context.attention)
    elif ranks.main and not split_experts:  # place_experts says how a split run shares the work
        log.info("%d processes (%s): %s", world_size, dist.get_backend(),
                 "FSDP2, the transformer sharded across them" if ranks.sharded else "trained parameters replicated, gradients summed")
    return ranks, device


def place_experts(ranks: Ranks, expert_names: list[str], method_sharded: bool) -> None:
    """`experts_on: split`: the first half of the ranks hold and train the first expert (WAN 2.2's high-noise one),
    the second half the other. Every rank draws the whole global batch's noise levels alike, so each sample is
    routed to exactly one group; inside a group the rows are split as data parallelism splits them, and
    gradients are summed within the group only."""
    if ranks.world_size % 2:
        raise WorldSizeError(f"experts_on = split gives each of WAN 2.2 A14B's two experts half of the processes, but this "
                             f"run has {ranks.world_size}. Start an even number (torchrun --nproc-per-node), or set "
                             "experts_on to together")
    half = ranks.world_size // 2
    if method_sharded and half > 1:
        raise WorldSizeError(f"experts_on = split with a fine-tune on {ranks.world_size} processes: each expert group would "
                             "have to shard its expert with FSDP2, which is not built. Start 2 processes (one per expert), "
                             "or set experts_on to together (FSDP2 over every process)")
    groups = [list(range(half)), list(range(half, ranks.world_size))]
    handles = [dist.new_group(group) for group in groups]  # every rank makes every group, in the same order
    mine = 0 if ranks.rank < half else 1
    ranks.expert, ranks.group, ranks.group_handle = expert_names[mine], groups[mine], handles[mine]
    if ranks.main:
        log.info("%d processes (%s), experts_on split: each group loads and trains one expert, its gradients summed "
                 "within the group", ranks.world_size, dist.get_backend())


def log_placement(ranks: Ranks, trainings: list, shares: dict[str, float]) -> None:
    """Which ranks train which expert, and the share of the clips each is expected to get."""
    if not ranks.main or not ranks.group:
        return
    half = ranks.world_size // 2
    for training, group in zip(trainings, [list(range(half)), list(range(half, ranks.world_size))]):
        expert = training.expert
        log.info("ranks %s train the %s expert (%s): %.1f%% of the clips expected", _span(group),
                 expert.label.replace("_", "-"), expert.name, 100 * shares[expert.name])


def log_shares(ranks: Ranks, trainings: list) -> None:
    """At the end of a split run: the clips each expert group trained."""
    if not ranks.main or not ranks.group:
        return
    total = sum(t.samples for t in trainings) or 1
    half = ranks.world_size // 2
    for training, group in zip(trainings, [list(range(half)), list(range(half, ranks.world_size))]):
        log.info("ranks %s trained the %s expert on %d of %d clips (%.1f%%) in %d steps", _span(group),
                 training.expert.label.replace("_", "-"), training.samples, total, 100 * training.samples / total,
                 training.steps)


def _span(group: list[int]) -> str:
    return str(group[0]) if len(group) == 1 else f"{group[0]}-{group[-1]}"


def _context_mesh(device: torch.device, world_size: int, degree: int, attention: str):
    """The device mesh (data, ring, ulysses): consecutive ranks share a clip, so a context group stays on one machine
    when the degree divides the GPUs per machine. → its (ring, ulysses) part, which diffusers' attention splits over."""
    from torch.distributed.device_mesh import init_device_mesh

    if attention == "ring" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"context_parallel.attention = ring on {device.type}: diffusers' ring attention merges partial "
                          "attentions by their log-sum-exp, which only its CUDA backends return (and motiontune's CPU "
                          "one). Use ulysses")
    ring, ulysses = (degree, 1) if attention == "ring" else (1, degree)
    mesh = init_device_mesh(device.type, (world_size // degree, ring, ulysses), mesh_dim_names=("data", "ring", "ulysses"))
    return mesh["ring", "ulysses"]


def enable_context_parallel(module: torch.nn.Module, ranks: Ranks, attention: str, plan: dict | None = None) -> None:
    """Split `module`'s tokens over the context group with `plan` (default: diffusers' own for it, `_cp_plan`) and its attention
    backends' Ulysses / ring implementations. What `ModelMixin.enable_parallelism` does, minus its device lookup
    (diffusers 0.42.1 takes `rank % torch.accelerator.device_count()`, a division by zero on a machine without one)."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    heads = getattr(module.config, "num_attention_heads", None)
    if attention == "ulysses" and heads and heads % ranks.context:
        raise ConfigError(f"context_parallel.degree = {ranks.context} with ulysses attention: the transformer's "
                          f"{heads} attention heads must split evenly over the processes; pick a degree dividing {heads}")
    degrees = {"ring_degree": ranks.context} if attention == "ring" else {"ulysses_degree": ranks.context}
    settings = ContextParallelConfig(**degrees, mesh=ranks.context_mesh)
    config = ParallelConfig(context_parallel_config=settings)
    device = next(module.parameters()).device
    config.setup(ranks.rank, ranks.world_size, device, mesh=ranks.context_mesh)
    module._parallel_config = config
    for part in module.modules():
        processor = getattr(part, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(module, settings, module._cp_plan if plan is None else plan)
    _correct_ulysses_backward()
    if attention == "ring" and device.type == "cpu":
        _ring_attention_on_the_cpu()


def _ring_attention_on_the_cpu() -> None:
    """Ring attention on a CPU (gloo). diffusers' ring (`TemplatedRingAttention`) merges each step's partial attention
    by its log-sum-exp; its CPU backend (native SDPA) returns none ('Native attention does not support
    return_lse=True'), and its `_native_flash` backend calls a kernel PyTorch has only for CUDA. PyTorch's CPU
    flash-attention kernel returns it (`_scaled_dot_product_flash_attention_for_cpu`, with a backward that takes the
    merged log-sum-exp, as the ring's backward needs). Ring calls on CPU tensors go to diffusers' ring with that
    kernel; every other call to the native backend is as before."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, \
        _templated_context_parallel_attention

    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    if getattr(native, "cpu_ring", False):
        return

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   return_lse=False, _save_ctx=True, _parallel_config=None):
        if attn_mask is not None or enable_gqa:
            raise ValueError("ring attention on the CPU takes no attention mask and no grouped queries")
        # (B, S, H, D) as diffusers lays them out; the kernel takes (B, H, S, D) and gives the lse as (B, H, S)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(x.transpose(1, 2) for x in (query, key, value)), dropout_p, is_causal, scale=scale)
        out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
        if _save_ctx:
            ctx.save_for_backward(query, key, value, out, lse)
            ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
        return (out, lse) if return_lse else out

    def backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
        # the ring's backward passes each step's keys and values with the merged out and lse
        saved = dict(zip(("query", "key", "value", "out", "lse"), ctx.saved_tensors))
        given = {"query": query, "key": key, "value": value, "out": out, "lse": lse}
        tensors = [saved[name] if given[name] is None else given[name] for name in saved]
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.transpose(1, 2).contiguous(), *(x.transpose(1, 2).contiguous() for x in tensors), ctx.dropout_p,
            ctx.is_causal, scale=ctx.scale)
        return tuple(g.transpose(1, 2).contiguous() for g in grads)

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  return_lse=False, _parallel_config=None):
        if (_parallel_config is not None and query.device.type == "cpu"
                and _parallel_config.context_parallel_config.ring_degree > 1):
            return _templated_context_parallel_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, forward_op=forward_op,
                backward_op=backward_op, _parallel_config=_parallel_config)
        return native(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config)

    attention.cpu_ring = True
    _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE] = attention


def _correct_ulysses_backward() -> None:
    """diffusers 0.42.1's Ulysses attention (`TemplatedUlyssesAttention.backward`) reshapes the key and value
    gradients with the queries' length, so an attention whose keys are not as long as its queries (LTX-2's prompt
    and audio-video cross-attentions; WAN's cross-attention does not take this path) fails in the backward, its
    forward being right. The same backward, each gradient reshaped with its own length."""
    from diffusers.models import attention_dispatch
    from diffusers.models.attention_dispatch import TemplatedUlyssesAttention, _all_to_all_single

    if getattr(TemplatedUlyssesAttention.backward, "corrected", False):
        return

    def backward(ctx, grad_out, *args):
        config = ctx._parallel_config.context_parallel_config
        world_size, group = config.ulysses_degree, config._ulysses_mesh.get_group()
        batch, length, heads, dim = grad_out.shape
        local_heads = heads // world_size
        grad_out = grad_out.reshape(batch, length, world_size, local_heads, dim).permute(2, 1, 0, 3, 4).contiguous()
        grad_out = _all_to_all_single(grad_out, group).flatten(0, 1).permute(1, 0, 2, 3).contiguous()
        grads = ctx.backward_op(ctx, grad_out)[:3]
        # (batch, world_size x local length, local heads, dim) → (batch, local length, heads, dim), each its own length
        grads = [g.reshape(batch, world_size, g.shape[1] // world_size, local_heads, dim).permute(1, 3, 0, 2, 4).contiguous()
                 for g in grads]
        grads = [_all_to_all_single(g, group).flatten(0, 1).permute(1, 2, 0, 3).contiguous() for g in grads]
        return (*grads, None, None, None, None, None, None, None, None, None)

    backward.corrected = True
    TemplatedUlyssesAttention.backward = staticmethod(backward)
    assert attention_dispatch.TemplatedUlyssesAttention is TemplatedUlyssesAttention


def check_divisible(ranks: Ranks, items_per_epoch: int, batch_size: int) -> None:
    if ranks.several and items_per_epoch < ranks.data_size:
        who = f"{ranks.world_size} processes" if ranks.context == 1 else f"{ranks.data_size} data-parallel groups"
        raise WorldSizeError(
            f"{who} but an epoch holds only {items_per_epoch} clip(s) (batch_size {batch_size} each): "
            f"every process needs at least one clip per step. Start fewer processes (torchrun --nproc-per-node), "
            "or add clips or raise the concept's repeats."
        )


def shard_transformer(module: torch.nn.Module, units: list[torch.nn.Module]) -> None:
    """FSDP2: each unit (a transformer block) gathers its weights just before use and frees them after;
    the root holds the rest (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit)
    fully_shard(module)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank must call this; rank 0 gets the whole state on the CPU, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optimizer_state: dict) -> None:
    """Rank 0's full state, spread to every rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    # strict=False: the backup holds only the trained weights (a layer_filter may freeze the rest)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    main = dist.get_rank() == 0
    set_model_state_dict(module, weights if main else {}, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state if main else {}, options=options)
