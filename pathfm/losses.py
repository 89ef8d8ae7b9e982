"""Self-supervised losses: DINO (with EMA centering or Sinkhorn-Knopp), iBOT, KoLeo, KDE.

Small functions of tensors and numbers. Every loss runs in fp32 with autocast off,
whatever the caller's autocast: softmax over 65k prototypes, exp at temperature
0.04 and log of small distances all lose too much in bf16.

Shapes: n_s student crops (global first, then local), n_t teacher (global) crops,
B images per rank, K prototypes.
"""

import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _fp32(fn):
    """Call fn with autocast off and every floating-point tensor argument cast to fp32."""

    def cast(a):
        return a.float() if torch.is_tensor(a) and a.is_floating_point() else a

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        device_type = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce when a process group exists; a no-op on one process."""
    if _distributed():
        dist.all_reduce(t, op=op)
    return t


@_fp32
def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Cross entropy between teacher and student crops, averaged over crop pairs.

    student_logits (n_s, B, K), teacher_probs (n_t, B, K). Every student crop is
    compared with every teacher crop except its own view: student crop i and
    teacher crop i (i < n_t) are the same global crop, which would teach nothing.
    """
    n_s, n_t = student_logits.shape[0], teacher_probs.shape[0]
    n_pairs = n_s * n_t - min(n_s, n_t)
    if n_pairs == 0:
        raise ValueError(f"dino_loss: {n_s} student and {n_t} teacher crops leave no pair of different views")
    log_p = F.log_softmax(student_logits / student_temp, dim=-1)  # (n_s, B, K)
    # ce[t, s] = mean over images of -sum_k p_t log p_s; one matmul over (B*K), no (n_t, n_s, B, K) tensor
    ce = -torch.einsum("tbk,sbk->ts", teacher_probs, log_p) / student_logits.shape[1]  # (n_t, n_s)
    return (ce.sum() - ce.diagonal().sum()) / n_pairs


class Centering(nn.Module):
    """Teacher centering (DINO): subtract an EMA of the mean teacher logit before the softmax.

    Centering stops one prototype from dominating; the sharp teacher temperature
    stops the output from going uniform. The centre is a buffer so it is saved and
    restored with the checkpoint.
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))  # (1, K)

    @torch.no_grad()
    @_fp32
    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        # teacher_logits (..., K) -> probabilities (..., K)
        return F.softmax((teacher_logits - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    @_fp32
    def update(self, teacher_logits: torch.Tensor) -> None:
        """EMA update with the mean teacher logit over every row on every rank."""
        rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])  # (N, K)
        # sum and row count reduced together: ranks may hold different numbers of rows
        # (iBOT masked patches), so the mean is total sum / total count, not a mean of means
        sum_and_count = torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])])  # (K + 1,)
        _all_reduce(sum_and_count)
        batch_center = sum_and_count[:-1] / sum_and_count[-1].clamp(min=1)  # (K,)
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)


@torch.no_grad()
@_fp32
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iters: int = 3) -> torch.Tensor:
    """Teacher targets with equal use of the prototypes (SwAV / DINOv2), instead of centering.

    teacher_logits (N, K) on this rank -> probabilities (N, K), rows summing to 1.
    Alternately normalises Q = exp(logits / T) so that, over the rows of all ranks,
    every prototype (column) gets the same total mass, and then every row mass 1.
    n_iters is small on purpose: the targets need only be roughly balanced.
    Ranks may hold different numbers of rows (iBOT patches), even none. SwAV and DINOv2
    also scale every row to 1 / (rows over all ranks) and the result back at the end: one
    factor shared by all ranks, which the next prototype normalisation divides out again,
    so it is left out here (and with it a collective to count the rows).
    """
    n_protos = teacher_logits.shape[1]
    # one (N, K) fp32 matrix, then worked on in place: at 131k prototypes over every patch a copy is gigabytes
    q = teacher_logits / teacher_temp  # (N, K)
    # subtract the global max so exp cannot overflow; a constant over all ranks cancels
    # in the first normalisation. A rank with no rows (iBOT, nothing masked) offers -inf.
    q_max = q.max() if q.numel() else q.new_tensor(float("-inf"))
    q = q.sub_(_all_reduce(q_max.reshape(1), op=dist.ReduceOp.MAX)).exp_().t()  # (K, N)
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(n_iters):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # (K, 1): each prototype has mass 1 ...
        q /= n_protos  # ... then 1/K
        q /= q.sum(dim=0, keepdim=True)  # (1, N): each row has mass 1 (local: rows are not shared)
    return q.t()  # (N, K), rows sum to 1


@_fp32
def ibot_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """Masked-patch cross entropy, each image weighted equally whatever its masked count.

    student_patch_logits, teacher_patch_probs (M, K): the M masked patches in image
    order, i.e. as `tokens[masks]` returns them. masks (n_images, n_patches) bool.
    loss = (1 / n_images) * sum_patches CE / (masked patches of its image);
    an image with no masked patch adds 0 but still counts in n_images.
    """
    n_masked = int(masks.sum())
    if student_patch_logits.shape[0] != n_masked or teacher_patch_probs.shape[0] != n_masked:
        raise ValueError(f"ibot_loss: masks select {n_masked} patches but got {student_patch_logits.shape[0]} "
                         f"student and {teacher_patch_probs.shape[0]} teacher rows; pass tokens[masks]")
    ce = -(teacher_patch_probs * F.log_softmax(student_patch_logits / student_temp, dim=-1)).sum(-1)  # (M,)
    per_image = masks.sum(dim=1, keepdim=True).clamp(min=1)  # (n_images, 1)
    weights = (masks / per_image)[masks]  # (M,) 1 / masked count of the patch's image
    return (ce * weights).sum() / masks.shape[0]


@_fp32
def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al. 2019), on this rank's batch.

    x (B, D) -> -mean_i log(||x_i - x_nn(i)|| + eps), on L2-normalised rows, where
    nn(i) is the nearest other row. Pushes each embedding away from its nearest
    neighbour. Duplicated rows give distance 0 and the loss stays finite (-log eps).
    """
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows to find neighbours, got x of shape {tuple(x.shape)}")
    x = F.normalize(x, dim=-1, eps=eps)  # (B, D)
    with torch.no_grad():
        sim = x @ x.t()  # (B, B) cosine; on the unit sphere, largest cosine = smallest distance
        sim.fill_diagonal_(-2.0)  # below any cosine: a row is not its own neighbour
        nn_idx = sim.argmax(dim=1)  # (B,)
    # distance recomputed from x with gradient; eps inside the sqrt keeps the gradient finite at 0
    dist_nn = ((x - x[nn_idx]).pow(2).sum(-1) + eps * eps).sqrt()  # (B,)
    return -torch.log(dist_nn + eps).mean()


@_fp32
def kde_loss(x: torch.Tensor, bandwidth: float = 5 ** -0.5) -> torch.Tensor:
    """KDE uniformity regulariser: mean log kernel density of the batch at its own points.

    Used by Midnight (Karasikov et al. 2025) in place of KoLeo, following Virchow 2
    (Zimmermann et al. 2024): KoLeo's nearest-neighbour distance collapses on the
    near-duplicate tiles common in pathology batches and its gradient explodes; a
    kernel density is bounded, so this loss is too.

        z_i = x_i / ||x_i||,   k(a, b) = exp(-||a - b||^2 / (2 h^2)),   h = bandwidth
        loss = 1/B sum_i log( 1/(B-1) sum_{j != i} k(z_i, z_j) )

    i.e. minus a leave-one-out KDE entropy estimate; minimising it spreads the CLS
    embeddings over the sphere. On unit vectors ||a - b||^2 = 2 - 2 a.b, so k is the
    von Mises-Fisher kernel exp(kappa a.b) up to a constant with kappa = 1 / h^2:
    the default h = 1/sqrt(5) is Virchow 2's kappa = 5. With the log outside the
    mean over i this would be the uniformity loss of Wang & Isola (2020) with
    t = 1 / (2 h^2); the per-point log above is the KDE entropy form of Virchow 2.
    On this rank's batch only, like KoLeo. Range: [-4 / (2 h^2), 0].
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"kde_loss needs at least 2 rows, got x of shape {tuple(x.shape)}")
    z = F.normalize(x, dim=-1)  # (B, D)
    sq_dist = (2 - 2 * z @ z.t()).clamp(min=0)  # (B, B) squared distances on the unit sphere
    log_k = -sq_dist / (2 * bandwidth**2)
    log_k = log_k.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("-inf"))  # leave self out
    # logsumexp: with a small bandwidth exp(log_k) underflows fp32 for far pairs
    return (torch.logsumexp(log_k, dim=1) - math.log(n - 1)).mean()
