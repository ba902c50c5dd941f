"""FSDP2 for full fine-tuning under torchrun: each rank holds 1/W of every weight, gradient and moment.

LoRA runs replicate the model and all-reduce the adapter gradients (grpo/distributed.py); a model with no
adapters would replicate every full gradient and optimizer state that way, so it is sharded instead with
PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), the layout of PyTorch's FSDP2 tutorial
(https://docs.pytorch.org/tutorials/intermediate/FSDP_tutorial.html) and of torchtitan's `apply_fsdp`:
one group per decoder layer, then the root (the causal LM: embeddings, final norm, lm_head, tied or not).
Parameters become DTensors sharded on dim 0; a layer's group is all-gathered just before its forward and
freed after it, gradients are reduce-scattered in backward. Nothing here changes the training math:

- Gradients are summed over ranks, not averaged (`set_gradient_divide_factor(1)`), as the DDP path does:
  the loss normalisers are the global batch's counts, so the sum is the single-process gradient.
- The trainer runs the decoder and reads `lm_head.weight` itself (log-probs from hidden states in chunks,
  no [n, T, V] logits), so the root's own forward hooks never fire. A hook on the decoder does the
  root's part: it all-gathers the root group before the decoder runs, and the group stays whole while
  the trainer reads lm_head.weight. The end of each backward reduce-scatters its gradients and frees it
  (FSDP2's final callback runs the post-backward of every group, used in the graph or not), so it is
  sharded again before every optimizer step; after a forward without autograd (old-policy log-probs)
  it stays whole until then. FSDP2 picks its root at the first forward, so one token goes through the
  causal LM when the model is sharded.
- Rollouts see whole weights: `gathered(model)` all-gathers every group for the whole rollout, and
  `GatheredGenerator` wraps the rollout backend in it. The engine binds the model's registered
  parameters at each `generate`, which are then the gathered ones (new addresses: its CUDA graphs are
  captured again, see LLMEngine._bind). Memory: for the rollout, every rank holds the whole model's
  weights again (what one GPU holds without FSDP) on top of its shards; gradients and optimizer state
  stay sharded. Gathering each layer just in time, as the training forward does, would need every rank
  to decode the same number of steps; ranks sample different completions, so it is not done.
- Checkpoints are the single-process files: `full_trainable_state` and `full_optimizer_state` gather
  whole tensors to rank 0 (a collective: every rank calls them), and `copy_full_` /
  `shard_optimizer_state` cut a whole tensor to this rank's shard on load, so a checkpoint resumes on
  any number of ranks.

Every rank must make the same calls in the same order (forwards, backwards, rollouts, checkpoints): each
is a collective. The trainer does; a rank that does not hangs the others until `ddp_timeout`.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..models.lora import decoder_and_head, is_peft_model
from . import distributed as dist

# grpo/optimizers.py's optimizers (8-bit, paged): their per-parameter state is whole tensors, not DTensor shards
UNSHARDED_OPTIMS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def is_sharded(model) -> bool:
    """True for a model that `shard_model` sharded."""
    return getattr(model, "ahazero_fsdp", None) is not None


@dataclass(eq=False)
class _Sharding:
    """What `shard_model` set up, kept on the model as `model.ahazero_fsdp`."""
    root: nn.Module  # the causal LM (an FSDPModule): embeddings, final norm, lm_head
    layers: list  # the decoder layers, one FSDPModule each
    gathered: int = 0  # depth of `gathered` contexts: while > 0 every group stays whole
    hook: object = None  # the decoder's forward pre-hook (a RemovableHandle)

    @property
    def modules(self) -> list:
        return self.layers + [self.root]


def check_supported(model, optim: str) -> None:
    """What FSDP2 full fine-tuning does not run, as errors before anything is sharded."""
    if is_peft_model(model):
        raise ValueError("FSDP2 is for full fine-tuning; a model with LoRA adapters trains data-parallel (DDP)")
    if optim in UNSHARDED_OPTIMS:
        raise ValueError(f"optim={optim!r} is not supported with full fine-tuning on several GPUs (FSDP2): its "
                         "state (8-bit or paged) does not follow the parameters' shards. Use optim='adamw_torch', "
                         "or LoRA.")
    if not dist.is_distributed():
        raise RuntimeError("shard_model needs an initialised process group of more than one rank (torchrun)")


def shard_model(model) -> None:
    """FSDP2 in place: `fully_shard` per decoder layer, then the root; summed gradients; the decoder
    hook described in the module docstring. Idempotent."""
    if is_sharded(model):
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    decoder, _ = decoder_and_head(model)
    layers = [fully_shard(layer, mesh=mesh) for layer in decoder_layers(decoder)]
    root = fully_shard(model, mesh=mesh)
    sharding = _Sharding(root=root, layers=layers)
    for module in sharding.modules:
        module.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is already divided by global counts
        module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM / AVG)
    _choose_root(model, sharding)
    sharding.hook = decoder.register_forward_pre_hook(functools.partial(_gather_root, sharding))
    model.ahazero_fsdp = sharding


def decoder_layers(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's blocks: `decoder.layers` (Llama, Qwen, Mistral, Phi-3 in transformers), else its one
    ModuleList of num_hidden_layers modules."""
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    count = getattr(decoder.config, "num_hidden_layers", None)
    found = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise TypeError(f"cannot find the decoder layers of {type(decoder).__name__} to shard them")
    return list(found[0])


def _choose_root(model, sharding: _Sharding) -> None:
    """FSDP2 takes the first module to run forward as the root (FSDPState._lazy_init), and the trainer
    never calls the causal LM itself: run one token through it, then free what it gathered."""
    with torch.no_grad(), dist.collective("FSDP2's first forward"):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    sharding.root.reshard()


def _gather_root(sharding: _Sharding, module, args) -> None:
    sharding.root.unshard()  # a no-op while it is whole


# --- rollouts ------------------------------------------------------------------------------------

@contextlib.contextmanager
def gathered(model):
    """Every parameter whole on every rank inside the block (a no-op on an unsharded model): the
    registered parameters are plain tensors, as without FSDP, so the engine and transformers' generate
    run unchanged. Module forwards inside keep them whole. On exit every group is sharded again.
    Memory: the whole model's weights per rank while inside. A collective: every rank enters together."""
    sharding = getattr(model, "ahazero_fsdp", None)
    if sharding is None:
        yield
        return
    if sharding.gathered == 0:
        with dist.collective("FSDP2 all-gather of the weights for the rollout"):
            for module in sharding.modules:  # one group at a time: one group's all-gather buffer at a time
                module.reshard()  # whatever a forward left whole is gathered afresh: never a stale copy
                module.set_reshard_after_forward(False, recurse=False)
                module.unshard()
    sharding.gathered += 1
    try:
        yield
    finally:
        sharding.gathered -= 1
        if sharding.gathered == 0:
            _reshard_all(sharding)


def _reshard_all(sharding: _Sharding) -> None:
    for layer in sharding.layers:
        layer.set_reshard_after_forward(True, recurse=False)  # the root keeps FSDP2's root default (False)
    for module in sharding.modules:
        module.reshard()


class GatheredGenerator:
    """A rollout backend (engine/types.py `Generator`) that generates from the gathered weights."""

    def __init__(self, inner, model):
        self.inner, self.model = inner, model

    def generate(self, prompt_token_ids, params, adapter=None):
        with gathered(self.model):
            return self.inner.generate(prompt_token_ids, params, adapter=adapter)

    def __getattr__(self, name):  # the inner backend's other attributes (runner, config, ...)
        if name in ("inner", "model"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def gather_for_rollouts(model, generator) -> GatheredGenerator:
    """`generator` wrapped in `GatheredGenerator`; the model's cached backend too (api.get_generator, which
    evaluation after training uses), so every later rollout sees whole weights."""
    settings = getattr(model, "ahazero", None)
    if settings is not None and settings.generator is not None:
        settings.generator = _gathering(settings.generator, model)
    return _gathering(generator, model)


def _gathering(generator, model) -> GatheredGenerator:
    return generator if isinstance(generator, GatheredGenerator) else GatheredGenerator(generator, model)


# --- checkpoints ---------------------------------------------------------------------------------

def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather: every rank calls it), a plain tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


@torch.no_grad()
def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """name -> whole trainable parameter on the CPU, the names and order of `named_parameters()` (what
    checkpoint.py's single-process `_trainable` gives), on rank 0; {} on the others. A collective."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = _whole(p.detach())
            if dist.is_main_process():
                out[name] = whole.contiguous().cpu()
    return out


@torch.no_grad()
def full_optimizer_state(optimizer) -> dict | None:
    """`optimizer.state_dict()` with every sharded tensor whole on the CPU (the single-process format:
    integer parameter ids), on rank 0; None on the others. A collective."""
    sd, main = optimizer.state_dict(), dist.is_main_process()
    state = {}
    for i in sorted(sd["state"]):  # the same order on every rank
        entry = {k: _whole(v) if torch.is_tensor(v) else v for k, v in sd["state"][i].items()}
        if main:
            state[i] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in entry.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else None


def _shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `whole` laid out as `param` (a DTensor), cut locally: no communication."""
    from torch.distributed.tensor import distribute_tensor
    if not _is_dtensor(param):
        return whole
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@torch.no_grad()
def copy_full_(param: torch.Tensor, whole: torch.Tensor) -> None:
    """param <- whole, where param may be an FSDP2 shard (then only this rank's rows are copied)."""
    param.copy_(_shard_like(whole.to(param.dtype), param))


def shard_optimizer_state(optimizer, state_dict: dict) -> dict:
    """A single-process `optimizer.state_dict()` (whole tensors) made loadable by an optimizer over
    sharded parameters: each per-element state tensor (the parameter's shape) becomes this rank's shard;
    scalars ("step") stay. Unchanged for plain parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(_is_dtensor(p) for p in params):
        return state_dict
    state = {}
    for i, entry in state_dict["state"].items():
        p = params[int(i)]
        state[i] = {k: _shard_like(v, p) if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v
                    for k, v in entry.items()}
    return {**state_dict, "state": state}
