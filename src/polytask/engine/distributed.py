"""Data-parallel joint training over ``torch.distributed``: N processes train one model on one global batch.

Start it with ``torchrun --nproc-per-node N -m polytask run CONFIG`` (or call ``polytask.fit`` / ``train_job``
under torchrun): :func:`init_from_env` joins the process group torchrun describes (gloo on the CPU, NCCL on CUDA),
and every job the process trains is data-parallel from then on.

What each rank does, per optimiser step (``engine.step.accumulated_step`` with a :class:`Collective`):

- every rank draws the same global batch (the batch order is a pure function of (seed, epoch, step)) and trains on
  its own contiguous share of each source's rows (:func:`shard`); the per-task fractions f_rk (rank r's share of
  task k's labelled rows in the global batch) are known on every rank without communication, so the K losses
  Σ_r f_rk L_rk are the global batch's mean losses;
- **loss weightings**: the K weighted losses are summed across ranks (one all-reduce of K numbers), every rank
  computes the same weights from them, back-propagates Σ_k w_k f_rk L_rk locally, and the parameter gradients are
  summed (one all-reduce, as DDP does);
- **aggregators, params mode**: the per-task Jacobian of the shared parameters J (K x P) is linear in the rows, so
  J = Σ_r J_r; it is summed across ranks (one all-reduce of K x P) *before* aggregation, never the aggregated
  directions: an aggregator is not linear, and the Gramian of the global Jacobian is not the mean of the local
  Gramians (J J^T = Σ_r Σ_s J_r J_s^T has cross terms). Every rank then aggregates the same J into the same
  direction; the heads' per-task gradients are summed likewise;
- **aggregators, representation mode**: the Jacobian's columns are (row, feature) pairs, each row on exactly one
  rank, so the global Gramian IS the sum of the local ones (no cross terms): Gramian-based aggregators all-reduce
  K x K numbers, every rank gets the same weights and pushes J_r^T w back through its own rows, and the encoder's
  gradients are summed. Aggregators that read the Jacobian itself (per-coordinate methods) gather every rank's
  rows (all-gather of K x B x D), aggregate the global Jacobian and keep their own rows of the direction;
- the method's state, the task weights and the optimiser update are therefore identical on every rank; terms that
  do not depend on the rows (an architecture's ``aux_loss``, the hooks' ``extra_loss``, which hooks compute from
  the global batch) are added on every rank after the reduction, never summed.

Equal to one process with the global batch to float rounding (sums in another order) for models whose forward pass
treats rows independently. Batch normalisation (statistics per rank's rows, as DDP without SyncBatchNorm) and dropout
(each rank draws its own masks) break that equality; the run is still correct data-parallel training.

Checkpoints hold no per-rank state (model, optimiser and method state are the same on every rank; rank 0 writes them,
every rank reads them), so a job killed on any rank resumes exactly, also on another world size: the resumed
steps equal the uninterrupted ones to float rounding (sums across another number of ranks round differently; with
the same world size the resume is bit-exact). F-MTL (``sam_rho``) is refused: its per-task perturbed losses would
need one more reduction per task.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from polytask.engine.data import Batch
from polytask.errors import ConfigError


@dataclass(frozen=True)
class Collective:
    """This process's place in the data-parallel group and the reductions the step needs."""

    rank: int
    world: int

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor summed across ranks, in one all-reduce of their concatenation (like DDP's buckets); the
        results are new tensors in the inputs' dtypes (float64 ones reduced in float64)."""
        if not tensors:
            return []
        out: list[Tensor] = [torch.empty(0)] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):  # one bucket per dtype, in first-seen order
            idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            buf = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            dist.all_reduce(buf)
            for i, part in zip(idx, buf.split([tensors[i].numel() for i in idx]), strict=True):
                out[i] = part.view(tensors[i].shape)
        return out

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every parameter's ``.grad`` by its sum across ranks. A parameter with no gradient on some rank
        counts as zeros there, and one with no gradient on any rank keeps none (the optimiser skips it, as in one
        process), so the ranks agree on what they reduce whatever their rows reached."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        dist.all_reduce(has)
        live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        for p, g in zip(live, self.sum(grads), strict=True):
            p.grad = g

    def gather_rows(self, blocks: Sequence[Tensor]) -> tuple[list[Tensor], list[int]]:
        """Each K x rows x ... block with every rank's rows concatenated in rank order, and where this rank's rows
        start in it (ranks may hold different numbers of rows: padded to the largest for the all-gather, then cut)."""
        out, starts = [], []
        for b in blocks:
            sizes = [torch.zeros(1, dtype=torch.long, device=b.device) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([b.shape[1]], device=b.device))
            n = [int(s) for s in sizes]
            padded = torch.zeros(b.shape[0], max(n), *b.shape[2:], dtype=b.dtype, device=b.device)
            padded[:, :b.shape[1]] = b
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded)
            out.append(torch.cat([p[:, :m] for p, m in zip(parts, n, strict=True)], dim=1))
            starts.append(sum(n[:self.rank]))
        return out, starts

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a decision every rank must share, e.g. a run directory's name)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()


def current() -> Collective | None:
    """The data-parallel group this process trains in, or None when it trains alone (no process group, or one
    of size 1)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return Collective(dist.get_rank(), dist.get_world_size())


def is_writer(comm: Collective | None = None) -> bool:
    """Whether this process writes the shared files (checkpoints, results, reports): rank 0, or a lone process.
    ``comm``: this process's group when the caller holds it (default: :func:`current`)."""
    comm = comm if comm is not None else current()
    return comm is None or comm.rank == 0


def init_from_env() -> Collective | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment), with gloo, or NCCL when
    this process has a CUDA device (``LOCAL_RANK`` picks it); a no-op when already joined or alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return current()
    if not dist.is_initialized():
        backend = os.environ.get("POLYTASK_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return current()


def shard(batch: tuple[Sequence[Any], Sequence[Tensor]], comm: Collective) -> tuple[Sequence[Any], list[Tensor]]:
    """This rank's share of a (sources, rows) micro-batch: a contiguous 1/N of each source's rows (the first ranks
    take one more row when N does not divide them; a rank may get none of a short last batch)."""
    sources, rows = batch
    return sources, [r.tensor_split(comm.world)[comm.rank] for r in rows]


def shard_batch(batch: Batch, comm: Collective) -> Batch:
    """:func:`shard` of a :class:`Batch`."""
    return Batch(*shard((batch.sources, batch.rows), comm))


def check_method(name: str, sam_rho: float) -> None:
    """Refuse what data-parallel training does not support (F-MTL), naming the method."""
    if sam_rho:
        raise ConfigError(f"method {name!r}: F-MTL (sam_rho) is not supported in data-parallel training (it would "
                          "need one reduction per task's perturbed loss); train it in one process")
