"""Data parallel GRPO on PyTorch's own runtime: `torchrun --nproc_per_node N -m ahazero train CONFIG`.

Small helpers over `torch.distributed`; every one is a no-op (or the identity) in a single process, so
the trainer calls them unconditionally only where that costs nothing.

The layout (see GRPOTrainer): rank r of W takes prompts r, r+W, ... of a step's global prompt list and
samples all num_generations completions of each itself, so group advantages need no communication.
Per step the ranks exchange: the rewards, lengths and truncation flags of their completions (one
all-gather: metrics over all completions, and the batch std when scale_rewards="batch"), the row and
token counts of each accumulation step (one all-reduce: the loss normalisers of the global batch), the
trainable gradients (one all-reduce per dtype, summed, before clipping) and the loss statistics. Full
fine-tuning (no LoRA) is sharded with FSDP2 instead (grpo/fsdp.py): its gradients are reduce-scattered in
the backward, and the rollout all-gathers the weights.

A rank that fails must not hang the others: `init_from_env` sets the collective timeout (GRPOConfig
`ddp_timeout`, default 300 s). A rank that dies closes its gloo connections, so the others fail at their
next collective at once; a rank that is alive but stuck (a reward function that never returns) makes
the others raise after the timeout. With NCCL the timeout is enforced by PyTorch's watchdog
(TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default), which aborts the process. Under torchrun, the agent
also stops every rank as soon as one exits with an error.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300
_timeout_s: float | None = None  # what init_from_env set, for error messages


class DistributedError(RuntimeError):
    """A collective failed: another rank crashed, or did not reach it within the timeout."""


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def main_process_only(fn):
    """Decorator: run `fn` on rank 0 only (returns None on the other ranks)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None
    return wrapper


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(timeout_s: float | None = None, backend: str | None = None) -> bool:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK).

    Backend nccl when CUDA is available, else gloo; on CUDA the rank's device becomes cuda:LOCAL_RANK
    (so `torch.device("cuda")` and model loading land on it). Idempotent; returns True when this process
    is part of a group of more than one rank. Without torchrun's variables it does nothing.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; cannot run under torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    global _timeout_s
    _timeout_s = float(timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=_timeout_s))
    return is_distributed()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collectives run: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def collective(what: str):
    """Turns a failed collective inside the block into a DistributedError that says what to look for."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        waited = f"ddp_timeout={_timeout_s:g} s" if _timeout_s is not None else "the process group's timeout"
        raise DistributedError(f"rank {rank()} of {world_size()}: {what} failed: another rank crashed, or did not "
                               f"reach it within {waited}. The first error in the other ranks' output is the "
                               f"cause. ({type(e).__name__}: {e})") from e


def _reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return tensor
    t = tensor.to(_comm_device()).contiguous()
    if t is tensor:
        t = t.clone()
    with collective("all_reduce"):
        dist.all_reduce(t, op=op)
    return t.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over ranks (a new tensor on tensor's device; `tensor` itself untouched)."""
    return _reduce(tensor, dist.ReduceOp.SUM if dist.is_available() else None)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, dist.ReduceOp.MAX if dist.is_available() else None)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's rows, then rank 1's, ... along dim 0 (every rank must pass the same shape)."""
    if not is_distributed():
        return tensor
    t = tensor.to(_comm_device()).contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    with collective("all_gather"):
        dist.all_gather(parts, t)
    return torch.cat(parts).to(tensor.device)


def all_reduce_grads_(params) -> None:
    """Sum the gradients of `params` over ranks, in place: one flat all-reduce per dtype. A parameter
    without a gradient takes part as zeros (and keeps it), so every rank reduces the same layout.
    FSDP2-sharded parameters (DTensors, grpo/fsdp.py) are skipped: their backward reduce-scattered them."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list] = {}
    for p in params:
        if _is_dtensor(p):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        flat = all_reduce_sum(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def barrier() -> None:
    if is_distributed():
        with collective("barrier"):
            dist.barrier()
