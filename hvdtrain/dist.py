"""Horovod, in one place: the only module of hvdtrain that imports horovod.

Order that matters (Horovod's rules): `init()` -> pin the device to `local_rank()` ->
build the DALI pipeline with shard_id=rank(), num_shards=size() -> `wrap_optimizer()`
(DistributedOptimizer with backward_passes_per_step = grad_accum_steps) ->
`broadcast_state()` so every rank starts from rank 0's parameters and optimizer state.

Every rank must run the same collectives in the same order; a rank that skips one
leaves the others waiting in it.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

import horovod.torch as hvd
from horovod.common.exceptions import HorovodInternalError

from hvdtrain import exits

_initialised = False


def is_collective_failure(e: BaseException) -> bool:
    """A collective failed: a peer rank stopped, or Horovod shut down after an error."""
    return isinstance(e, HorovodInternalError) or (
        isinstance(e, RuntimeError) and "Horovod has been shut down" in str(e))


class GpuLayoutError(RuntimeError):
    """More ranks on a node than GPUs it shows: the message says what to run instead."""


def gpu_for_rank(local_rank: int, local_size: int, visible_gpus: int) -> int | None:
    """The GPU this rank drives: one rank per GPU, by local rank; None with no visible GPU
    (the CPU path, Gloo). More local ranks than GPUs raises GpuLayoutError: NCCL refuses two
    ranks on one GPU ("duplicate GPU") and they would share its memory and SMs anyway."""
    if visible_gpus <= 0:
        return None
    if local_size > visible_gpus:
        raise GpuLayoutError(
            f"{local_size} ranks on this node but it shows {visible_gpus} GPU(s); hvdtrain runs one rank per "
            f"GPU. Run `horovodrun -np {visible_gpus} -H localhost:{visible_gpus} python -m ...` on this node "
            f"(over several nodes: {visible_gpus} ranks per node), or run {local_size} ranks on the CPU with "
            f"Gloo by hiding the GPUs: CUDA_VISIBLE_DEVICES= horovodrun -np {local_size} ...")
    return local_rank


def init() -> None:
    """Start Horovod (idempotent) and pin this process to its GPU before DALI or NCCL
    touch one. More local ranks than GPUs stops every rank at once (exits.REFUSED) with
    the command to run instead."""
    global _initialised
    if not _initialised:
        hvd.init()
        _initialised = True
    if torch.cuda.is_available():
        try:
            gpu = gpu_for_rank(local_rank(), local_size(), torch.cuda.device_count())
        except GpuLayoutError as e:
            if local_rank() == 0:
                print(f"hvdtrain: {e}", file=sys.stderr, flush=True)
            raise SystemExit(exits.REFUSED) from None
        torch.cuda.set_device(gpu)


def rank() -> int:
    return hvd.rank()


def local_rank() -> int:
    return hvd.local_rank()


def size() -> int:
    return hvd.size()


def local_size() -> int:
    return hvd.local_size()


def node_name() -> str:
    """The node this rank runs on, as the launcher named it: horovodrun's `-H` host
    (HOROVOD_HOSTNAME; launch/slurm.py sets it from the node list under srun), else
    Slurm's node name, else the host name. Under horovodrun the batch step's SLURM_*
    variables reach every rank over ssh, so SLURMD_NODENAME alone would name one node."""
    return (os.environ.get("HOROVOD_HOSTNAME") or os.environ.get("SLURMD_NODENAME")
            or platform.node())


def placement() -> list[dict]:
    """Where every rank runs (one allgather_object; every rank calls it): rank, node,
    local rank/size, cross rank/size and pid, in rank order."""
    global last_placement
    me = {"rank": rank(), "node": node_name(), "local_rank": local_rank(), "local_size": local_size(),
          "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size(), "pid": os.getpid()}
    last_placement = allgather_object(me, name="placement")
    return last_placement


last_placement: list[dict] = []  # the newest placement(): named in a failed collective's message


def is_primary() -> bool:
    return hvd.rank() == 0


def device() -> torch.device:
    """cuda:<local rank> where there is a GPU, else cpu."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def allreduce_mean(t: torch.Tensor, name: str | None = None, fp16: bool = False) -> torch.Tensor:
    """Mean over ranks. One collective: batch several metrics into one tensor.
    `fp16`: Horovod's fp16 compression on the wire (half the bytes, fp16 rounding)."""
    compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none
    return hvd.allreduce(t, op=hvd.Average, name=name, compression=compression)


def allreduce_sum(t: torch.Tensor, name: str | None = None) -> torch.Tensor:
    return hvd.allreduce(t, op=hvd.Sum, name=name)


def allreduce_sum_async(t: torch.Tensor, name: str | None = None):
    """Start a sum over ranks and return at once: `synchronize(handle)` gives the result.
    A small collective started after one step and read after the next costs the loop no
    wait (hvdtrain.preempt). Start the next one under the same name only after that."""
    return hvd.allreduce_async(t, op=hvd.Sum, name=name)


def synchronize(handle) -> torch.Tensor:
    return hvd.synchronize(handle)


def allgather(t: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order."""
    return hvd.allgather(t, name=name)


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled; for small things such as key lists)."""
    return hvd.allgather_object(obj, name=name)


def broadcast_object(obj: Any, root: int = 0, name: str | None = None) -> Any:
    return hvd.broadcast_object(obj, root_rank=root, name=name)


def wrap_optimizer(opt: torch.optim.Optimizer, model: torch.nn.Module, backward_passes_per_step: int,
                   fp16_compression: bool = False) -> torch.optim.Optimizer:
    """DistributedOptimizer: gradients are averaged over ranks every
    `backward_passes_per_step` backward passes (the caller divides the loss by that
    number). More backward passes than that before `step()` raises, and so does
    `zero_grad()` between `backward()` and `step()`."""
    compression = hvd.Compression.fp16 if fp16_compression else hvd.Compression.none
    wrapped = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       backward_passes_per_step=backward_passes_per_step,
                                       compression=compression)
    # Horovod re-creates the optimizer from its param groups, which keep `fused`, but the
    # flag that lets GradScaler hand a fused step found_inf on the device (instead of an
    # .item() host sync per step) is set by the constructor: carry it over
    if getattr(opt, "_step_supports_amp_scaling", False):
        wrapped._step_supports_amp_scaling = True
    return wrapped


def broadcast_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None, root: int = 0) -> None:
    """Rank `root`'s optimizer state, then its parameters and buffers, to every rank.

    Optimizer first: Horovod initialises an empty optimizer state with one zero-gradient
    step, which moves the parameters under weight decay; on a resumed run only the
    non-root ranks take that step, so the parameters must be sent after it."""
    if opt is not None:
        hvd.broadcast_optimizer_state(opt, root_rank=root)
    hvd.broadcast_parameters(model.state_dict(), root_rank=root)


def allgather_grad(t: torch.Tensor) -> torch.Tensor:
    """allgather that gradients flow back through (each rank gets its slice's gradient):
    contrastive negatives from every rank."""
    return hvd.allgather(t)


def elastic_state(model: torch.nn.Module, opt: torch.optim.Optimizer, **values: Any):
    """Horovod elastic's TorchState: model, optimizer and `values` are committed in memory
    and restored on the survivors when a worker is lost.

    Its sync broadcasts its handlers in keyword order, and TorchState(model=, optimizer=)
    puts the model first (horovod/torch/elastic/state.py, `kwargs.update(dict(model=...,
    optimizer=...))`). A worker that joins has an empty optimizer state, which
    broadcast_optimizer_state fills with one zero-gradient step (horovod/torch/functions.py):
    under weight decay that moves the joiner's weights after they were broadcast, and the
    ranks would train on different weights from then on. Handlers are picked by type, so
    the optimizer goes under a name that comes first, as in `broadcast_state`."""
    return hvd.elastic.TorchState(model=None, optimizer=None, **{"opt_first": opt, "model_after_opt": model},
                                  **values)


def elastic_run(fn):
    """hvd.elastic.run: re-runs `fn(state)` after a membership change (Gloo only)."""
    return hvd.elastic.run(fn)


def barrier() -> None:
    hvd.barrier()


def shutdown() -> None:
    global _initialised
    if _initialised:
        hvd.shutdown()
        _initialised = False


def cores_per_rank() -> int:
    """CPU cores this process may use: the affinity set shared among local ranks, and no
    more than Slurm's --cpus-per-task where a job set it (a cluster without task affinity
    leaves every task the whole node: 4 ranks x all cores would oversubscribe it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, local_size()))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(share, int(per_task)) if per_task.isdigit() and int(per_task) > 0 else share


# ---------------------------------------------------------------- launching without horovodrun
_rendezvous = None


def start_rendezvous_server(alloc: list[tuple[str, int]]) -> int:
    """Horovod's Gloo rendezvous server for an allocation [(host, slots)], as horovodrun
    starts it; returns its port. For `LAUNCHER=srun` (launch/slurm.py), where each
    Slurm task is one rank and finds the server through HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT."""
    global _rendezvous
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    hosts = parse_hosts(",".join(f"{h}:{k}" for h, k in alloc))
    plan = get_host_assignments(hosts, sum(k for _, k in alloc))
    _rendezvous = RendezvousServer(verbose=0)
    port = _rendezvous.start()
    _rendezvous.init(plan)
    return port


def serve_forever() -> None:
    """Keep the rendezvous server's process alive until it is signalled."""
    import signal
    import time

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(3600)
