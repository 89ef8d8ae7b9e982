"""Checkpoints: sharded (torch.distributed.checkpoint), atomic, resumable on another number of ranks.

    checkpoints/step_0000500/   .metadata + shards, meta.json, rng_rank{r}.pt
    checkpoints/last            text file naming the last complete step folder

A step folder is written as `step_XXXXXXX.tmp` and renamed once every rank has finished, so a
killed write leaves the previous checkpoint as the last complete one. An existing step folder is
never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns on every call without a process group, and a single process is a supported case here:
    silence that one warning inside our own DCP calls, not process-wide."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The last complete checkpoint: the `last` pointer, else the newest complete step folder."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "last"
    if pointer.is_file():
        cand = ckpt_dir / pointer.read_text().strip()
        if (cand / "meta.json").is_file():
            return cand
    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "meta.json").is_file())
    return steps[-1] if steps else None


def _rng_state() -> dict:
    """Every generator's state as tensors only, so it loads with torch.load(weights_only=True)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # ("MT19937", (624,) uint32, int, int, float)
    py_version, py_state, py_gauss = random.getstate()  # (3, 625 ints, None or float)
    return {"torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
            "numpy_rest": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
            "python": torch.tensor(py_state, dtype=torch.int64),
            "python_gauss": torch.tensor([] if py_gauss is None else [py_gauss], dtype=torch.float64),
            "python_version": torch.tensor(py_version),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    py_gauss = state["python_gauss"].tolist()
    random.setstate((int(state["python_version"]), tuple(state["python"].tolist()), py_gauss[0] if py_gauss else None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _app_state(student, ema, optimizer, loss_state, gram=None) -> dict:
    return {
        "student": get_model_state_dict(student),
        "ema": get_model_state_dict(ema),
        "optimizer": get_optimizer_state_dict(student, optimizer),
        "loss": loss_state.state_dict(),
        **({"gram": get_model_state_dict(gram)} if gram is not None else {}),  # the Gram teacher (pathfm/gram.py)
    }




class CheckpointError(OSError):
    """A checkpoint that was not written, with the same one-line message on every rank (naming the ranks that
    failed); the previous checkpoint is intact. .ranks: the ranks that failed, .step: the step being saved."""

    def __init__(self, errno_: int, message: str, ranks=(), step: int = 0):
        super().__init__(errno_, message)
        self.ranks, self.step = list(ranks), step


class DiskFullError(CheckpointError):
    """No space for a checkpoint; the message names the folder and the size, the previous one is intact."""


def _no_space(ckpt_dir: Path, name: str, tmp: Path, models) -> DiskFullError:
    """Remove the half-written folder and say what was needed (parameters and the two AdamW moments)."""
    shutil.rmtree(tmp, ignore_errors=True)
    student, ema = models
    need = sum(p.numel() * p.element_size() for p in student.parameters()) * 3
    need += sum(p.numel() * p.element_size() for p in ema.parameters())
    free = shutil.disk_usage(ckpt_dir).free
    last = ckpt_dir / "last"
    kept = f"the previous checkpoint {last.read_text().strip()} is intact" if last.exists() else "no earlier checkpoint"
    return DiskFullError(errno.ENOSPC, f"no space left on the device of {ckpt_dir} while writing {name}: it needs "
                         f"about {need / 1e6:,.0f} MB, {free / 1e6:,.0f} MB are free; {kept}. Free space (or lower "
                         "train.keep_last) and run the same command again to resume")


PROBE_HOLD = "probe.hold"  # in a step folder: a probe has not read it yet (eval/watch.py removes it once it has)
MAX_HELD = 2  # held folders kept beyond keep_last: a probe process that died cannot make them pile up


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> list[Path]:
    """train.keep_last, applied by whoever touches the folder last: the trainer after each save, the probe
    process (eval/watch.py) after it releases a hold and whenever it looks. The newest keep_last step folders
    stay; an older one stays only while a probe holds it (PROBE_HOLD), at most the newest MAX_HELD such; the rest
    are removed. Returns the removed folders.

    The folder is listed here, at the call, never earlier: a caller that read it before the other side saved or
    released would keep a folder that nobody prunes afterwards. Two callers at once are safe: an older listing
    removes a subset of what a newer one removes."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} would delete the newest checkpoint; keep at least 1")
    steps = sorted(p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    excess = steps[: max(len(steps) - keep_last, 0)]
    held = [p for p in excess if (p / PROBE_HOLD).exists()]
    held = held[max(len(held) - MAX_HELD, 0):]  # the newest MAX_HELD
    gone = [p for p in excess if p not in held]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save_checkpoint(ckpt_dir: str | Path, step: int, *, student, ema, optimizer, loss_state, meta: dict,
                    rank: int = 0, keep_last: int = 3, hold: bool = False, gram=None) -> Path:
    """Save on every rank (collective), keeping the newest keep_last (>= 1) step folders. Returns the step folder.

    hold: mark the folder for a probe (PROBE_HOLD); pruning keeps a held folder until the probe has copied the
    EMA out of it (seconds), at most MAX_HELD of them beyond keep_last."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} would delete the checkpoint just written; keep at least 1")
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_name(step)
    if final.exists():  # already saved at this step (e.g. a signal right after a periodic save)
        return final
    tmp = ckpt_dir / (step_name(step) + ".tmp")
    # Each phase ends in _agree: every rank learns whether any rank failed, so a write that fails on some
    # ranks (a full disk, an exception) ends every rank with the same error instead of leaving the others
    # waiting at the next collective. Nothing is renamed unless every rank wrote its part.
    failure = None
    try:
        if rank == 0:
            for stale in ckpt_dir.glob("step_*.tmp"):  # left over from a killed write; never a complete checkpoint
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as e:
        failure = e
    _raise_if_failed(_agree(failure), ckpt_dir, final.name, tmp, (student, ema), rank, step)
    try:
        with quiet_dcp():
            dcp.save(_app_state(student, ema, optimizer, loss_state, gram), checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:  # dcp.save ends with a collective: every rank's shards are written by now
            world = dist.get_world_size() if dist.is_initialized() else 1
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": world}, indent=2) + "\n")
            if hold:
                (tmp / PROBE_HOLD).write_text("")
    except (Exception, dcp.CheckpointException) as e:  # DCP wraps a writer's OSError in a CheckpointException
        failure = e
    _raise_if_failed(_agree(failure), ckpt_dir, final.name, tmp, (student, ema), rank, step)
    try:
        if rank == 0:
            tmp.rename(final)
            pointer_tmp = ckpt_dir / "last.tmp"
            pointer_tmp.write_text(final.name + "\n")
            pointer_tmp.replace(ckpt_dir / "last")
            prune_checkpoints(ckpt_dir, keep_last)
    except OSError as e:  # the step folder may be complete already; latest_checkpoint finds it without the pointer
        failure = e
    _raise_if_failed(_agree(failure), ckpt_dir, final.name, tmp, (student, ema), rank, step)
    return final


def _one_line(e: BaseException) -> str:
    """What went wrong on this rank, in one line: a DCP CheckpointException's first per-rank failure."""
    failures = getattr(e, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _agree(failure: BaseException | None) -> dict[int, tuple[bool, str]]:
    """{rank: (out of space, one-line reason)} for every rank whose part failed, known to every rank.

    A collective (all_gather_object), reached by every rank whether its own part failed or not."""
    mine = None if failure is None else (_is_no_space(failure), _one_line(failure))
    if not dist.is_initialized():
        return {} if mine is None else {0: mine}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {r: f for r, f in enumerate(everyone) if f is not None}


def _raise_if_failed(failed: dict, ckpt_dir: Path, name: str, tmp: Path, models, rank: int, step: int) -> None:
    """Every rank raises the same error when any rank failed: rank 0 removes the half-written folder and words
    the message (free space is read once), the others receive it."""
    if not failed:
        return
    no_space = any(full for full, _ in failed.values())
    message = None
    if rank == 0:
        if no_space:
            message = _no_space(ckpt_dir, name, tmp, models).strerror
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            last = ckpt_dir / "last"
            kept = f"the previous checkpoint {last.read_text().strip()} is intact" if last.exists() else "no earlier checkpoint"
            message = f"checkpoint {name} was not written; {kept}"
        who = "; ".join(f"rank {r}: {reason}" for r, (_, reason) in sorted(failed.items()))
        message = f"{message} (failed on {who})"
    if dist.is_initialized():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    error = DiskFullError if no_space else CheckpointError
    raise error(errno.ENOSPC if no_space else errno.EIO, message, ranks=sorted(failed), step=step)


def _is_no_space(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain, or in a DCP CheckpointException's per-rank failures."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC:
            return True
        failures = getattr(e, "failures", {}).values()  # rank -> (exception, stack)
        if any(_is_no_space(f[0] if isinstance(f, tuple) else f) for f in failures):
            return True
        e = e.__cause__ or e.__context__
    return False


def load_checkpoint(path: str | Path, *, student, ema, optimizer, loss_state, rank: int = 0, gram=None) -> dict:
    """Restore everything saved by `save_checkpoint` (any number of ranks); returns meta.json, with "gram_restored":
    whether the Gram teacher `gram` was restored (a checkpoint of a run without Gram anchoring has none)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    meta["gram_restored"] = gram is not None and any(k.startswith("gram.") for k in saved)
    state = _app_state(student, ema, optimizer, loss_state, gram if meta["gram_restored"] else None)
    key = ema_key(path)
    state[key] = state.pop("ema")
    # A parameter that never had a gradient (the iBOT mask token in a DINO run) has no AdamW state in
    # the checkpoint, while a fresh optimizer offers one for every parameter: leave it without, as in
    # the run that saved it.
    state["optimizer"]["state"] = {fqn: s for fqn, s in state["optimizer"]["state"].items()
                                   if all(f"optimizer.state.{fqn}.{k}" in saved for k in s)}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(student, state["student"])
    set_model_state_dict(ema, state[key])
    if meta["gram_restored"]:
        set_model_state_dict(gram, state["gram"])
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    loss_state.load_state_dict(state["loss"])
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:  # resumed on more ranks than were saved: a fresh, deterministic stream for the new ranks
        torch.manual_seed(meta["step"] * 1000 + rank)
    return meta


def load_weights(path: str | Path, *, student, ema) -> dict:
    """Model weights only (no optimizer, step or RNG): the start of a post-training run."""
    path = resolve_checkpoint(path)
    key = ema_key(path)
    state = {"student": get_model_state_dict(student), key: get_model_state_dict(ema)}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(student, state["student"])
    set_model_state_dict(ema, state[key])
    return json.loads((path / "meta.json").read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder, a `last` pointer, a checkpoints folder or a run folder -> the step folder."""
    path = Path(path)
    if path.is_file() and path.name == "last":
        return resolve_checkpoint(path.parent / path.read_text().strip())
    if (path / "meta.json").is_file() and (path / ".metadata").is_file():
        return path
    for folder in (path, path / "checkpoints"):
        found = latest_checkpoint(folder) if folder.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete pathfm checkpoint at '{path}' (expected a step folder with meta.json, "
                            "a checkpoints/last pointer, or a run folder)")


def ema_key(step_dir: str | Path) -> str:
    """The name a checkpoint gives the student's EMA: "ema", or "teacher" in those written before it was renamed
    (so they still resume, load and export)."""
    saved = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    return "ema" if any(k.startswith("ema.") for k in saved) else "teacher"
