"""Which pixels of a training batch changed between two commits? (issue 27 item 9)

`dump` writes the first batch (step 0) of configs/learn_cpu.yaml on the two real slides, as the loader
worker makes it: the raw tiles with their (slide, mpp, x, y), and the views. It runs in whichever tree
`pathfm` is imported from, so one copy of this script serves an old checkout too (its Views signature is
either (cfg, plan) or the older (cfg, patch_size, ibot)). `compare` says which tiles moved or changed
and how far each view differs, split between tiles that are identical and tiles that are not:

    cd /tmp/old && PYTHONPATH=/tmp/old python /work/main/bench/first_batch.py dump /tmp/fb_old.pt
    cd /tmp/new && PYTHONPATH=/tmp/new python /work/main/bench/first_batch.py dump /tmp/fb_new.pt
    python bench/first_batch.py compare /tmp/fb_old.pt /tmp/fb_new.pt
    cd /tmp/new && PYTHONPATH=/tmp/new python /work/main/bench/first_batch.py dump /tmp/fb_off.pt --full-decode --torch-colour
"""

import argparse
import inspect
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIDES = (("slides/CMU-1-Small-Region.svs", ""), ("slides/TCGA-CR-7395-01A-01-TS1.svs", "0.5"))  # as bench/learn.py


def dump(out: str, data: str, seed: int, full_decode: bool = False, torch_colour: bool = False) -> None:
    import torch

    import pathfm
    from pathfm.config import load_config
    from pathfm.data import loader

    if full_decode:  # before 058d27a: full-size decode + resize at the drawn position (bench/learn_switch.py)
        import pathfm.data.sampler as sampler
        sampler.decode_scale = lambda region, size: 1
    if torch_colour:  # before c136d15: MultiCrop's torch hue and blur
        from pathfm.data import augment
        augment.OPENCV = False
    work = Path(tempfile.mkdtemp(prefix="first_batch_"))  # its own index and masks: nothing shared between trees
    manifest = work / "manifest.csv"
    manifest.write_text("path,mpp\n" + "".join(f"{Path(data, p).resolve()},{mpp}\n" for p, mpp in SLIDES))
    cfg = load_config("configs/learn_cpu.yaml", [f"data.manifest={manifest}", f"train.seed={seed}",
                                                 f"data.cache_dir={work / 'cache'}"])
    index = loader.slide_index(cfg)
    if "plan" in inspect.signature(loader.Views.__init__).parameters:
        from pathfm.plan import make_plan
        views = loader.Views(cfg, make_plan(cfg))
    else:  # before the step plan (3950931)
        views = loader.Views(cfg, cfg.model.patch_size, cfg.ssl.objective == "dinov2")
    raw = loader.tile_dataset(cfg, index, rank=0, world_size=1).batch(0)
    made = loader.tile_dataset(cfg, index, rank=0, world_size=1, transform=views).batch(0)
    torch.save({"pathfm": pathfm.__file__, "tiles": raw["tiles"], "locations": raw["locations"],
                "views": {k: v for k, v in made["tiles"].items() if k.endswith("_crops")}}, out)
    print(f"{out}: {len(raw['locations'])} tiles from {pathfm.__file__}")


def compare(a_path: str, b_path: str) -> None:
    import torch

    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    print(f"A = {a['pathfm']}\nB = {b['pathfm']}")
    same = []
    for i, (la, lb) in enumerate(zip(a["locations"], b["locations"])):
        ta, tb = a["tiles"][i].float(), b["tiles"][i].float()
        same.append(la == lb and torch.equal(ta, tb))
        if not same[-1]:
            print(f"tile {i}: (slide, mpp, x, y) {tuple(la)} -> {tuple(lb)}, mean |d| {(ta - tb).abs().mean():.1f} grey levels")
    same = torch.tensor(same)
    print(f"{int(same.sum())} of {len(same)} tiles identical (position and pixels)")
    for name, va in a["views"].items():
        vb = b["views"][name]
        d = (va - vb).abs().flatten(1).amax(1)  # (V * B,) crop-major: view v of tile i is row v * B + i
        keep = same.repeat(len(d) // len(same))
        print(f"{name}: max |d| over the views of identical tiles {d[keep].max() if keep.any() else float('nan'):.3g}; "
              f"median max |d| over the others {d[~keep].median() if (~keep).any() else float('nan'):.3g}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="write this tree's first batch (run in the tree's root)")
    d.add_argument("out")
    d.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the folder with slides/")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--full-decode", action="store_true", help="sampler.decode_scale -> 1 (trees after 058d27a)")
    d.add_argument("--torch-colour", action="store_true", help="augment.OPENCV = False (trees after c136d15)")
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("a")
    c.add_argument("b")
    a = p.parse_args(argv)
    dump(a.out, a.data, a.seed, a.full_decode, a.torch_colour) if a.cmd == "dump" else compare(a.a, a.b)


if __name__ == "__main__":
    main()
