"""Peak memory of one training step per device, from the real step run on fake tensors in a fake world.

    usage = estimate(run, world_size=64)        # run(env, tracker): builds the models and runs the step (train.py)
    print(report(usage, device_gib=80))
    usage = measure(run, env)                   # the same step on real tensors, tracked the same way

A fake process group of `world_size` ranks (torch's "fake" backend: collectives return at once) and
FakeTensorMode (tensors with shapes, dtypes and storages but no data) run pathfm's own code: the model
build, dist.wrap_model (FSDP2 shards over the fake world, activation checkpointing, the bf16 policy), the
frozen teacher, and the step as the loop runs it. Nothing is allocated and nothing computed, so ViT-g/14 at 64
ranks costs seconds of one core.

The Tracker (a TorchDispatchMode) sees every tensor an operator returns, remembers its storage and hears when
that storage is freed (or resized: FSDP2 frees and re-allocates the all-gathered parameters by resizing their
storages). The log of allocations and frees is replayed afterwards, so a tensor's category can come from
anything learned during its life: parameters, gradients and optimizer state are named by the step's driver
(Tracker.label), the FSDP all-gather buffers by the operator that made them, activations are what the
student's forward allocated and still holds when backward starts, and everything else is a temporary, named by
the line of pathfm code that allocated it (`t_patch_logits = ...`).

On fake tensors the step still needs a few real numbers: the iBOT masks decide how many patch rows exist, so
they are made with real values (Tracker.values) and every operator on real tensors alone runs for real;
reading any other number from a fake tensor gives 1 (a loss, a gradient norm) or False (a flag). The devices here are CPUs, so the
estimate runs on fake CPU tensors with the GPU run's dtypes (bf16 autocast and FSDP's bf16 parameters): it
counts what PyTorch's operators return, not what a CUDA kernel allocates inside itself (workspaces, cuBLAS
handles), the caching allocator's fragmentation and rounding beyond 512 bytes, or the CUDA context (~0.5 GB).
"""

from __future__ import annotations

import contextlib
import linecache
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from pathfm.dist import DistEnv

PATHFM = str(Path(__file__).resolve().parent)
HERE = str(Path(__file__).resolve())
GIB = 2**30
FORWARD_PHASES = ("student forward",)  # what the student's forward allocates and backward still needs: activations
CATEGORIES = ("parameters", "parameters, all-gathered", "gradients", "optimizer state", "activations", "temporaries")
NOT_COUNTED = ("kernel workspaces and temporaries inside a kernel, the caching allocator's fragmentation, "
               "the CUDA context (~0.5 GiB)")


@dataclass
class Alloc:
    nbytes: int
    phase: str
    op: str
    site: str
    category: str = ""  # set by Tracker.label; else decided at the end
    detail: str = ""
    freed_at: int = -1  # index into the event log; -1 = alive at the end


@dataclass
class Usage:
    """One step's peak on one device: bytes by category, where it happened, the largest items alive then."""
    peak: int
    phase: str
    op: str
    by_category: dict
    items: list  # [(bytes, category, what)], largest first
    world_size: int = 1
    fake: bool = True
    notes: list = field(default_factory=list)
    phase_peaks: dict = field(default_factory=dict)  # {phase: the largest total while in it}

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB


class Tracker(TorchDispatchMode):
    """Every storage an operator returns, its size, when it is freed, and what allocated it.

    fake_mode: the FakeTensorMode the step runs in (None: real tensors). The step's driver marks phases
    (`with tracker.phase("backward"):`), names the persistent tensors (`tracker.label("gradients", grads)`), and
    opens the window the peak is taken over (`tracker.start_window()`, before the step whose peak counts).
    """

    def __init__(self, fake_mode=None, round_to: int = 512):
        super().__init__()
        self.fake_mode, self.round_to = fake_mode, round_to
        self.allocs: list[Alloc] = []
        self.events: list[tuple[int, int]] = []  # (alloc index, bytes: + allocated, - freed)
        self.phases: list[tuple[int, str]] = []  # (event index, phase entered)
        self._phase, self._window = "build", 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}  # id(storage) -> (alloc index, weak reference)
        self._size: dict[int, int] = {}  # alloc index -> bytes now
        self._sites: dict[tuple, str] = {}

    # ---- what the driver calls -----------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str):
        before = self._phase
        self._set_phase(name)
        try:
            yield
        finally:
            self._set_phase(before)

    def start_window(self) -> None:
        """The peak is taken from here on (the steady-state step, after one that created the optimizer state)."""
        self._window = len(self.events)

    def label(self, category: str, tensors, detail: str = "") -> None:
        """Name the storages of these tensors (DTensors: their local shards) for the whole of their life."""
        for t in tensors:
            for inner in _plain(t):
                entry = self._live.get(id(inner.untyped_storage()))
                if entry is not None:
                    a = self.allocs[entry[0]]
                    a.category, a.detail = category, detail or a.detail

    @contextlib.contextmanager
    def values(self):
        """Tensors made here hold real values also in an estimate (small inputs the step reads: the iBOT masks)."""
        if self.fake_mode is None:
            yield
            return
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            yield

    # ---- the dispatch mode -----------------------------------------------------------------------------

    def __enter__(self):
        self._resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st, size):  # FSDP2 frees (size 0) and re-allocates all-gathered parameters in place
            out = tracker._resize(st, size)
            tracker._seen_storage(st, "resize_ (FSDP all-gather)", gathered=True)
            return out

        torch.UntypedStorage.resize_ = resize_
        self._module_to, self._module_to_empty = torch.nn.Module.to, torch.nn.Module.to_empty
        if self.fake_mode is not None:
            def to(module, *args, **kwargs):
                # On fake tensors Module.to() swaps every parameter (swap_tensors), which the fake mode's weak memo
                # of new parameters refuses. A move to the device and dtype they already have changes nothing.
                device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
                tensors = [*module.parameters(), *module.buffers()]
                if dtype is None and device is not None and all(t.device == device for t in tensors):
                    return module
                return tracker._module_to(module, *args, **kwargs)

            def to_empty(module, *, device, recurse=True):  # the same refusal; nothing holds these tensors yet
                for m in module.modules() if recurse else [module]:
                    for name, p in m._parameters.items():
                        if p is not None:
                            m._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
                    for name, b in m._buffers.items():
                        if b is not None:
                            m._buffers[name] = torch.empty_like(b, device=device)
                return module

            torch.nn.Module.to = to
            torch.nn.Module.to_empty = to_empty
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        torch.nn.Module.to, torch.nn.Module.to_empty = self._module_to, self._module_to_empty
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._fake_call(func, args, kwargs) if self.fake_mode is not None else func(*args, **kwargs)
        name = func.overloadpacket.__name__
        gathered = "all_gather" in name
        for t in _tensors(out):
            for inner in _plain(t):
                self._seen_storage(inner.untyped_storage(), name, gathered)
        for t in _tensors((args, kwargs)):  # out= arguments and in-place resizes
            if not is_traceable_wrapper_subclass(t) and id(st := t.untyped_storage()) in self._live:
                self._seen_storage(st, name, gathered)
        return out

    def _fake_call(self, func, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        flat = list(_tensors((args, kwargs)))
        fake = [t for t in flat if isinstance(t, FakeTensor) or is_traceable_wrapper_subclass(t)]
        if func is torch.ops.aten._local_scalar_dense.default and fake:  # a number read from a fake tensor
            # False for a flag: code that loops until nothing is left to redo (trunc_normal_'s resampling) stops
            return False if fake[0].dtype == torch.bool else 1.0 if fake[0].is_floating_point() else 1
        if flat and not fake:  # every input real (the masks and what is computed from them): compute for real
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if fake and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool and not isinstance(t, FakeTensor)
                        for t in flat):  # tokens[masks]: real boolean indices -> real integer ones, so the shape is known
            args = _bool_indices_to_long(args)
        out = func(*args, **kwargs)
        if not flat and isinstance(out, torch.Tensor) and not out.is_floating_point() and out.numel() <= 2**16:
            with unset_fake_temporarily():  # a small integer factory (device mesh ranks, randperm): real values
                return func(*args, **kwargs)
        return out

    # ---- bookkeeping -----------------------------------------------------------------------------------

    def _set_phase(self, name: str) -> None:
        self._phase = name
        self.phases.append((len(self.events), name))

    def _bytes(self, st) -> int:
        n = st.nbytes()
        return -(-n // self.round_to) * self.round_to if n else 0

    def _seen_storage(self, st, op: str, gathered: bool = False) -> None:
        key = id(st)
        nbytes = self._bytes(st)
        entry = self._live.get(key)
        if entry is None:
            index = len(self.allocs)
            self.allocs.append(Alloc(0, self._phase, op, self._site(),
                                     category="parameters, all-gathered" if gathered else ""))
            self._size[index] = 0
            self._live[key] = (index, weakref.ref(st, lambda _, key=key: self._freed(key)))
        else:
            index = entry[0]
        delta = nbytes - self._size[index]
        if delta:
            self._size[index] = nbytes
            self.allocs[index].nbytes = max(self.allocs[index].nbytes, nbytes)
            self.events.append((index, delta))

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is None:
            return
        index = entry[0]
        if self._size[index]:
            self.events.append((index, -self._size[index]))
            self._size[index] = 0
        self.allocs[index].freed_at = len(self.events)

    def _site(self) -> str:
        """The line of pathfm/train.py, and of the innermost other pathfm file, whose call allocated this."""
        frame, train, inner = sys._getframe(3), None, None
        while frame is not None and train is None:
            name = frame.f_code.co_filename
            if name.startswith(PATHFM) and name != HERE:
                if name.endswith("train.py"):
                    train = frame
                elif inner is None:
                    inner = frame
            frame = frame.f_back
        key = tuple((f.f_code.co_filename, f.f_lineno) for f in (train, inner) if f is not None)
        if key not in self._sites:
            self._sites[key] = " > ".join(f"{Path(file).name}:{line} {linecache.getline(file, line).strip()[:70]}"
                                          for file, line in key)
        return self._sites[key]

    # ---- the result --------------------------------------------------------------------------------------

    def usage(self, world_size: int = 1) -> Usage:
        """Replay the log: the peak inside the window, and what was alive at that moment."""
        total, peak, at = 0, -1, self._window
        starts, current, phase_peaks = dict(self.phases), "build", {}  # event index -> the phase entered there
        for i, (_, delta) in enumerate(self.events):
            current = starts.get(i, current)
            total += delta
            if i >= self._window:
                phase_peaks[current] = max(phase_peaks.get(current, 0), total)
                if total > peak:
                    peak, at = total, i
        live: dict[int, int] = {}
        for index, delta in self.events[: at + 1]:
            live[index] = live.get(index, 0) + delta
        phase = next((name for i, name in reversed(self.phases) if i <= at), "build")
        backward_at = next((i for i, name in self.phases if i >= self._window and name == "backward"), len(self.events))
        by_category, groups = dict.fromkeys(CATEGORIES, 0), {}
        for index, nbytes in live.items():
            if nbytes <= 0:
                continue
            a = self.allocs[index]
            category = a.category or ("activations" if a.phase in FORWARD_PHASES and (a.freed_at < 0 or a.freed_at > backward_at)
                                      else "temporaries")
            by_category[category] = by_category.get(category, 0) + nbytes
            what = a.detail or (a.site or f"({a.phase}) aten.{a.op}")
            if category == "temporaries" and not a.site.startswith("train.py"):
                what = f"{a.phase}: aten.{a.op}" + (f" at {a.site}" if a.site else "")
            key = (category, what)
            groups[key] = groups.get(key, 0) + nbytes
        items = sorted(((n, c, w) for (c, w), n in groups.items()), reverse=True)
        op = self.allocs[self.events[at][0]].op if self.events else ""
        return Usage(peak=max(peak, 0), phase=phase, op=op, by_category=by_category, items=items,
                     world_size=world_size, fake=self.fake_mode is not None, phase_peaks=phase_peaks)


def _tensors(x):
    """The tensors in nested lists, tuples and dicts of an operator's arguments or results (pytree's flatten,
    without its cost: this runs for every operator)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _plain(t: torch.Tensor):
    """The plain tensors holding t's memory: t itself, or a DTensor's local shard (recursively)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, torch.Tensor):
                yield from _plain(inner)
    else:
        yield t


def _bool_indices_to_long(args):
    def convert(x):
        if isinstance(x, (list, tuple)):
            return type(x)(convert(y) for y in x)
        if isinstance(x, torch.Tensor) and x.dtype == torch.bool and type(x) is torch.Tensor:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return list(x.nonzero().unbind(1))
        return x

    out = []
    for a in args:
        if isinstance(a, (list, tuple)) and any(isinstance(y, torch.Tensor) and y.dtype == torch.bool for y in a):
            flat = []
            for y in a:  # one boolean index of k dimensions becomes k integer indices
                c = convert(y)
                flat.extend(c if isinstance(c, list) else [c])
            out.append(type(a)(flat))
        else:
            out.append(a)
    return tuple(out)


# ---- the fake world and the two ways to run a step ------------------------------------------------------


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake process group of world_size ranks, this process rank 0: collectives return at once."""
    if dist.is_initialized():
        raise RuntimeError("fake_world: a process group already exists in this process")
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        yield DistEnv(0, world_size, 0, torch.device("cpu"), "fake")
    finally:
        dist.destroy_process_group()


def estimate(run, world_size: int) -> Usage:
    """run(env, tracker) on fake tensors with a fake process group of world_size ranks: the peak on one rank."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with fake_world(world_size) as env, FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, warnings.catch_warnings():
        # deepcopy of a fake tensor (the EMA's copy of the student) reads its data pointer inside torch, which warns
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor", UserWarning)
        with Tracker(fake_mode) as tracker:
            run(env, tracker)
    usage = tracker.usage(world_size)
    usage.notes.append(f"fake CPU tensors with the GPU run's dtypes; not counted: {NOT_COUNTED}")
    return usage


def measure(run, env: DistEnv) -> tuple[Usage, int]:
    """run(env, tracker) on real tensors: (the tracker's usage, the allocator's peak bytes over the same window).

    The allocator's figure comes from the profiler's allocation events: at every allocation and free the c10 CPU
    allocator reports its running total of live bytes (kernels' internal buffers included). Neither RSS (pages the
    C allocator keeps after a free) nor tracemalloc (Python's own allocator only) measures that.
    """
    from torch.profiler import ProfilerActivity, profile

    tracker, marker = Tracker(round_to=1), torch.autograd.profiler.record_function(WINDOW)
    start_window = tracker.start_window

    def start_and_mark():  # the profiler's clock for the window's start: an event of its own
        start_window()
        marker.__enter__()

    tracker.start_window = start_and_mark
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with tracker:
            run(env, tracker)
        if marker.record is not None:
            marker.__exit__(None, None, None)
    return tracker.usage(env.world_size), allocator_peak(prof)


WINDOW = "pathfm.memory.window"


def allocator_peak(prof) -> int:
    """The CPU allocator's largest live total inside the window, from a profile(profile_memory=True): each
    allocation and free event carries the allocator's running total of live bytes (c10's profiled CPU memory
    reporter), so the peak is the largest total after the window opened."""
    from torch._C._profiler import _EventType

    allocations, window = [], []

    def walk(node):
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.total_allocated))
        elif node.tag == _EventType.TorchOp and node.name == WINDOW:
            window.append(node.start_time_ns)
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    since = min(window, default=0)
    return max((total for t, total in allocations if t >= since), default=0)


# ---- what fits -----------------------------------------------------------------------------------------


def largest_batch(peak_at, limit_bytes: int, start: int, low: int = 2, upper: int = 4096) -> int:
    """The largest per-device batch in [low, upper] whose peak_at(batch) (bytes) is at most limit_bytes; 0 when not
    even `low` fits (2: KoLeo and KDE need two images per crop).

    Peak memory grows about linearly with the batch: two estimates give a line, the line a guess, and steps from
    the guess then a bisection decide (a handful of estimates).
    """
    known = {}

    def fits(b):
        if b not in known:
            known[b] = peak_at(b) <= limit_bytes
        return known[b]

    a, b = max(low, start // 2), max(low + 1, start)
    pa, pb = peak_at(a), peak_at(b)
    known[a], known[b] = pa <= limit_bytes, pb <= limit_bytes
    guess = int(min(upper, max(low, a + (limit_bytes - pa) / max((pb - pa) / (b - a), 1.0))))
    step = max(1, guess // 16)
    if fits(guess):
        lo = hi = guess
        while hi < upper and fits(hi):
            lo, hi = hi, min(upper, hi + step)
        if fits(hi):
            return hi
    else:
        lo = hi = guess
        while lo > low and not fits(lo):
            hi, lo = lo, max(low, lo - step)
        if not fits(lo):
            return 0
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---- the report -----------------------------------------------------------------------------------------


def report(usage: Usage, device_gib: float | None = None, title: str = "", top: int = 6) -> str:
    """Lines for a person: the peak, its phase, the categories, the largest items alive at the peak."""
    where = f"during {usage.phase}" + (f" (aten.{usage.op})" if usage.op else "")
    head = f"{title}: " if title else ""
    lines = [f"{head}peak {usage.peak_gib:.2f} GiB per device ({usage.world_size} rank(s)), {where}"
             + (f"; the device has {device_gib:g} GiB" if device_gib else "")]
    for c in CATEGORIES:
        if usage.by_category.get(c):
            lines.append(f"  {c:<26} {usage.by_category[c] / GIB:8.2f} GiB")
    lines.append("  largest at the peak:")
    for nbytes, category, what in usage.items[:top]:
        lines.append(f"    {nbytes / GIB:7.2f} GiB  {category:<15.15} {what}")
    lines += [f"  note: {n}" for n in usage.notes]
    return "\n".join(lines)

