"""bench/learn.py with the data-path changes since 97e96c6 switched off (issue 27 item 9).

--full-decode: every JPEG tile decoded at full size and resized, at the drawn position (before 058d27a's
scaled IDCT, which also moves a tile to the scaled decode's grid); --torch-colour: MultiCrop's torch hue
and blur instead of OpenCV's (before c136d15). The same module switches as bench/data.py's rows; the
loader's worker is forked after they are set, so it sees them. With both, today's first learn_cpu batch is
bit-identical to 97e96c6's (bench/first_batch.py). Run it from a tree's root with PYTHONPATH set to it
(nothing here puts /work/main on the path, so an older checkout's bench/learn.py and pathfm are the ones run):

    cd TREE && PYTHONPATH=TREE python /work/main/bench/learn_switch.py --full-decode --torch-colour -- \
        --out /tmp/learn_off --data /work/shared/data --steps 100 --probe-every 50 --threads 1 train.seed=0
"""

import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-decode", action="store_true", help="sampler.decode_scale -> 1 (full-size decode + resize)")
    p.add_argument("--torch-colour", action="store_true", help="augment.OPENCV = False (torch hue and blur)")
    p.add_argument("learn_args", nargs=argparse.REMAINDER, help="-- then bench/learn.py's arguments")
    a = p.parse_args(argv)
    if a.full_decode:
        import pathfm.data.sampler as sampler
        sampler.decode_scale = lambda region, size: 1
    if a.torch_colour:
        from pathfm.data import augment
        augment.OPENCV = False
    from bench.learn import main as learn_main
    return learn_main(a.learn_args[1:] if a.learn_args[:1] == ["--"] else a.learn_args)


if __name__ == "__main__":
    main()
