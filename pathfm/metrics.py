"""What a run reports: RankMe, memory, and a logger writing metrics.jsonl + TensorBoard + a progress line."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values.

    embeddings: (N, D). Ranges from 1 (collapsed) to min(N, D) (full rank, flat spectrum).
    """
    s = torch.linalg.svdvals(embeddings.double())  # (min(N, D),)
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


COLLAPSE_SPREAD = 1e-3  # spread below this: mean cosine similarity above 0.999, the embeddings are one point


def spread(embeddings: torch.Tensor) -> float:
    """1 - |mean of the L2-normalised rows|^2 of (N, D) embeddings: the total variance of the unit vectors, which
    is also 1 - their mean pairwise cosine similarity (self-pairs included). 0 = every row points the same way,
    about 1 = spread over the sphere."""
    u = torch.nn.functional.normalize(embeddings.detach().double(), dim=1)  # a number for the log, no graph
    return float(1 - u.mean(0).square().sum())


def collapse_warning(spread_value: float, rankme_value: float, what: str) -> str | None:
    """The warning for embeddings whose spread says they are (near-)identical, else None; a pure function of the
    two numbers, so the trainer (teacher CLS tokens) and eval (probe embeddings) say the same thing."""
    if spread_value >= COLLAPSE_SPREAD:
        return None
    return (f"{what} have collapsed: spread {spread_value:.2e} (mean cosine similarity {1 - spread_value:.4f}), "
            f"RankMe {rankme_value:.2f}: every image gets (nearly) the same embedding")


def relative_entropy(probs: torch.Tensor) -> float:
    """Mean entropy of the rows of probs (N, K), divided by ln K: 1 = uniform rows, 0 = one-hot rows.

    On the teacher's DINO targets this says whether the teacher still says anything: at 1 every
    image gets the same flat target and the DINO loss is ln K whatever the student does.
    """
    p = probs.double()
    h = -(p * p.clamp(min=1e-30).log()).sum(-1).mean()
    return float(h / math.log(probs.shape[-1]))


def student_teacher_kl(dino_loss: float, teacher_probs: torch.Tensor) -> float:
    """KL(teacher || student) of the DINO loss, in nats: cross entropy minus the teacher's mean entropy.

    teacher_probs (n_t * B, K). Exact for pathfm's dino_loss, where every teacher crop is paired with
    the same number of student crops. Near 0 with relative_entropy near 1 is the uniform plateau:
    the student matches a teacher that is flat.
    """
    p = teacher_probs.double()
    return dino_loss - float(-(p * p.clamp(min=1e-30).log()).sum(-1).mean())


class PlateauWatch:
    """Warns once when the DINO loss has stayed within `tol` (relative) of ln K for `patience` steps
    in a row after `after_step` (the end of the lr warm-up): the uniform plateau, where teacher and
    student outputs are flat and nothing but the KoLeo / KDE term moves the backbone."""

    def __init__(self, num_prototypes: int, patience: int, after_step: int, tol: float = 0.01):
        self.log_k, self.patience, self.after, self.tol = math.log(num_prototypes), patience, after_step, tol
        self.run, self.fired = 0, False

    def update(self, step: int, dino_loss: float) -> str | None:
        """The warning text the one time it fires, else None."""
        if self.patience <= 0 or self.fired or step < self.after:
            return None
        self.run = self.run + 1 if abs(dino_loss - self.log_k) <= self.tol * self.log_k else 0
        if self.run < self.patience:
            return None
        self.fired = True
        return (f"step {step}: the DINO loss has been at ln K = {self.log_k:.3f} (within {self.tol:.0%}) for "
                f"{self.run} steps after warm-up: teacher and student outputs are uniform and the run is not "
                "learning. See the README, 'What a healthy start looks like' (LayerScale init, prototypes, "
                "teacher temperature, lr).")


class CollapseWatch:
    """Warns once when embeddings that had spread out collapse (collapse_warning on a logged batch).

    Embeddings that start collapsed are normal (LayerScale 1e-5 leaves every CLS token alike for the first steps;
    a run that never leaves that state shows as the ln K plateau): a collapse is news only after a logged batch
    whose embeddings were spread out."""

    def __init__(self, what: str):
        self.what, self.spread_at, self.warned = what, None, False  # spread_at: the last step not collapsed

    def update(self, step: int, spread_value: float, rankme_value: float) -> tuple[str | None, str | None]:
        """(collapse, warning): collapse_warning's text for this batch (None: spread out), and the full warning
        the one time a collapse follows a spread-out batch (else None)."""
        collapse = collapse_warning(spread_value, rankme_value, f"step {step}: {self.what}")
        if collapse is None:
            self.spread_at = step
            return None, None
        if self.spread_at is None or self.warned:
            return collapse, None
        self.warned = True
        return collapse, (f"{collapse}, after they had spread out at step {self.spread_at}; probes of this model will "
                          "score at chance. Check the lr, the teacher temperature and momentum, and the KoLeo / KDE "
                          "weight")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class StepTimer:
    """Wall time per phase of a step (data, forward, backward, optimizer).

    With sync=True each lap waits for the GPU, so its work is counted in the phase that queued it;
    that costs a little overlap, so it is for benchmarks (train.sync_timing), not production runs.
    """

    def __init__(self, device: torch.device, sync: bool = False):
        self.sync = sync and device.type == "cuda"
        self.start()

    def start(self) -> None:
        self.t, self.laps = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[name] = now - self.t
        self.t = now

    def total(self) -> float:
        return sum(self.laps.values())


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short by a kill (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Logger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool = True, resume_step: int | None = None):
        """resume_step: the checkpoint's step when resuming. What the previous launch logged after it is dropped
        (metrics.jsonl rewritten, TensorBoard told to purge), since those steps are done again: each step once."""
        self.enabled, self.total_steps = enabled, total_steps
        self.start_time, self.start_step = time.perf_counter(), None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= resume_step]
            path.with_suffix(".jsonl.tmp").write_text("".join(keep))
            path.with_suffix(".jsonl.tmp").replace(path)
        self.jsonl = open(path, "a")
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def event(self, step: int, values: dict) -> None:
        """A record that is not a number to plot (a restart): metrics.jsonl only."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.event(step, values)
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.enabled:
            self.tb.add_image(tag, grid, step)

    def progress(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.start_time = step, time.perf_counter()
            eta = "?"
        else:
            per_step = (time.perf_counter() - self.start_time) / max(step - self.start_step, 1)
            eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (self.total_steps - step)))
        print(f"step {step:>7d}/{self.total_steps} | loss {values['loss/total']:.4f} | lr {values['lr']:.2e} | "
              f"{values.get('images_per_s', 0):7.1f} img/s | eta {eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
