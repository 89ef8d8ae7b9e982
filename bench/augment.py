"""Samples/s per core of MultiCrop vs a per-image torchvision/PIL DINOv2 pipeline (2 x 224 + 8 x 96).

    python bench/augment.py [--batch 32] [--repeats 5] [--tile 256]
    python bench/augment.py --device-path [--device cuda]    # device-side mode: per-crop vs batched
    python bench/augment.py --device-path --device cuda --config configs/vits16.yaml   # a recipe's crops, batch, tile

Both run in this process with torch.set_num_threads(1), on the same real H&E tiles (the nine
NCT-CRC-HE tiles of shared/data, resized to --tile px); the table gives medians over --repeats,
timed alternately. --device-path times MultiCrop's two ways of applying one batch's parameters
(per-crop calls vs batched render) on --device, counts the torch calls each makes per batch (on a
GPU each is at least one kernel launch; counted on the meta device, which runs the device code
path without a device), and compares the batched views with the CPU mode's.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torchvision import transforms as T

from pathfm.data import augment
from pathfm.data.augment import MultiCrop

TILES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiles" / "nct_crc_he_100k_sample9"


def load_tiles(n: int, size: int) -> list[Image.Image]:
    paths = sorted(TILES.glob("*/*.tif"))
    if not paths:
        raise SystemExit(f"no tiles found under {TILES}")
    images = [Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC) for p in paths]
    return [images[i % len(images)] for i in range(n)]


def pil_dinov2(n_local: int = 8):
    """DINOv2's multi-crop recipe with torchvision v1 transforms on PIL images, plus vertical flips."""
    bicubic = T.InterpolationMode.BICUBIC
    color = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    blur = lambda p: T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)
    flips = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    norm = [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    g1 = T.Compose([T.RandomResizedCrop(224, (0.32, 1.0), interpolation=bicubic), *flips, *color, blur(1.0), *norm])
    g2 = T.Compose([T.RandomResizedCrop(224, (0.32, 1.0), interpolation=bicubic), *flips, *color, blur(0.1),
                    T.RandomSolarize(128, p=0.2), *norm])
    loc = T.Compose([T.RandomResizedCrop(96, (0.05, 0.32), interpolation=bicubic), *flips, *color, blur(0.5), *norm])
    return lambda img: [g1(img), g2(img)] + [loc(img) for _ in range(n_local)]


def tiles_for_device_path(n: int, size: int) -> tuple[list[Image.Image], str]:
    """The real tiles where shared/data has them (a GPU machine may not), else pathfm's synthetic H&E texture."""
    try:
        return load_tiles(n, size), "real H&E tiles"
    except SystemExit:
        from pathfm.data.synthetic import _tissue_tile

        rng = np.random.default_rng(0)
        return [Image.fromarray(_tissue_tile(rng, size)) for _ in range(n)], "synthetic H&E texture (no real tiles here)"


def tile_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, T, T) uint8, channels-last: a view of (B, T, T, 3), as the sampler yields tiles."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)


def time_interleaved(fns: dict, repeats: int) -> dict:
    """Seconds per call of each fn, alternating between them so that load from other processes
    on a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            CPU_TIMES.setdefault(name, []).append(time.process_time() - cpu)
    return times


CPU_TIMES = {}  # name -> CPU seconds per call of the last time_interleaved: per core even on a loaded machine


class CountCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside `with CountCalls() as c:` (c.calls)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def device_path(tiles: torch.Tensor, device: str, repeats: int, mc: MultiCrop | None = None) -> dict:
    """MultiCrop's device-side mode on `device` for one batch of uint8 tiles (B, 3, T, T): samples/s of the
    per-crop and batched renders (and of the CPU mode on one core), torch calls per batch, and how far
    the batched views are from the CPU mode's (in grey levels of the 0-255 input)."""
    mc = mc or MultiCrop(n_local=8, hed_jitter=0.05)
    params = mc.sample_params(tiles.shape[0], tiles.shape[2], tiles.shape[3], torch.Generator().manual_seed(0))
    calls = {}
    for batched in (False, True):
        with CountCalls() as c:
            mc.apply(tiles.to("meta"), params, batched=batched)
        calls[batched] = c.calls
    on_device = tiles.to(device)

    def run(batched):
        out = mc.apply(on_device, params, batched=batched)
        if on_device.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU mode per core, as loader workers run it
    try:
        cpu = mc.apply(tiles, params, batched=False)
        fns = {"cpu_mode": lambda: mc.apply(tiles, params, batched=False), "batched": lambda: run(True)}
        if on_device.device.type != "cpu":  # on the CPU, the per-crop render is the CPU mode
            fns["per_crop"] = lambda: run(False)
        rows = time_interleaved(fns, repeats)
    finally:
        torch.set_num_threads(threads)
    batched = run(True)
    diff = torch.cat([(batched[k].cpu() - cpu[k]).abs().flatten() for k in cpu]) * 255 * max(mc.std)  # grey levels
    rate = {name: tiles.shape[0] / statistics.median(t) for name, t in rows.items()}
    return {"device": str(on_device.device), "batch": tiles.shape[0], "tile": tiles.shape[2], "n_local": mc.n_local,
            "global_size": mc.global_size, "local_size": mc.local_size,
            "samples_per_s": rate, "torch_calls_per_batch": {"per_crop": calls[False], "batched": calls[True]},
            "max_diff_levels": float(diff.max()), "share_differing": float((diff > 0.5).float().mean())}


def device_path_table(r: dict) -> str:
    rate, calls = r["samples_per_s"], r["torch_calls_per_batch"]
    return "\n".join([
        f"| device-side mode on {r['device']}, batch {r['batch']}, 2 x {r['global_size']} + {r['n_local']} x "
        f"{r['local_size']} from {r['tile']} px " + (f"({r['config']}) " if r.get("config") else "") +
        f"{r['tiles']} "
        "| samples/s | torch calls per batch |",
        "|---|---|---|",
        f"| CPU mode, 1 thread (loader worker) | {rate['cpu_mode']:.1f} | - |",
        f"| device-side, per-crop calls | {rate['per_crop']:.1f} | {calls['per_crop']} |" if "per_crop" in rate else
        f"| device-side, per-crop calls | - (on the CPU this is the CPU mode) | {calls['per_crop']} |",
        f"| device-side, batched | {rate['batched']:.1f} | {calls['batched']} |",
        f"| batched views vs CPU mode | max {r['max_diff_levels']:.2f} grey levels, "
        f"{100 * r['share_differing']:.2f}% of values differ | |"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default 32, or the --config's optim.batch_size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tile", type=int, default=None, help="default 256, or the --config's data.tile_size")
    parser.add_argument("--config", help="with --device-path: MultiCrop, batch and tile size of this recipe")
    parser.add_argument("--device-path", action="store_true", help="device-side mode: per-crop vs batched render")
    parser.add_argument("--device", default="cpu", help="with --device-path: where the device-side mode runs")
    parser.add_argument("--json", help="with --device-path: also write the result to this file")
    args = parser.parse_args()
    mc, extra = None, {}
    if args.config:  # the recipe's own crops (pathfm.data.loader.Views), batch and tile size
        from pathfm.config import load_config
        from pathfm.data.loader import multicrop

        cfg = load_config(args.config)
        mc, extra = multicrop(cfg.crops), {"config": Path(args.config).stem}
        args.batch, args.tile = args.batch or cfg.optim.batch_size, args.tile or cfg.data.tile_size
    args.batch, args.tile = args.batch or 32, args.tile or 256
    if args.device_path:
        images, source = tiles_for_device_path(args.batch, args.tile)
        result = {**device_path(tile_tensor(images), args.device, args.repeats, mc), "tiles": source, **extra}
        print(device_path_table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return
    torch.set_num_threads(1)

    images = load_tiles(args.batch, args.tile)
    tiles = tile_tensor(images)  # (B, 3, T, T)
    multicrop, generator = MultiCrop(), torch.Generator().manual_seed(0)
    pipeline = pil_dinov2()

    def ours(opencv):
        augment.OPENCV = opencv
        return multicrop(tiles, generator)

    rows = time_interleaved({
        "torchvision v1 / PIL, per image": lambda: [pipeline(im) for im in images],
        "pathfm MultiCrop, torch colour ops (before OpenCV)": lambda: ours(False),
        "pathfm MultiCrop, batched uint8": lambda: ours(True),
    }, args.repeats)
    rates = {name: args.batch / statistics.median(t) for name, t in rows.items()}
    cpu = {name: args.batch / statistics.median(CPU_TIMES[name]) for name in rows}
    print(f"| pipeline (2 x 224 + 8 x 96 from {args.tile} px, 1 thread, batch {args.batch}) | samples/s (wall) | "
          "samples/s per CPU-second |")
    print("|---|---|---|")
    for name in rates:
        print(f"| {name} | {rates[name]:.1f} | {cpu[name]:.1f} |")
    pil = list(rows)[0]
    for name in list(rows)[1:]:
        print(f"| {name} / PIL | {rates[name] / rates[pil]:.2f}x | {cpu[name] / cpu[pil]:.2f}x |")


if __name__ == "__main__":
    main()
