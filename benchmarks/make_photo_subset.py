"""A small two-class photo set of mixed sizes from the clothing photos (docs/results.md):

    python benchmarks/make_photo_subset.py CLOTHING_DIR shirt t-shirt OUT [--per-class 125]

CLOTHING_DIR is the unpacked ``clothing-small/`` (train/ and validation/). Each photo is
randomly cropped (70-100% of its width, 60-100% of its height), scaled by 0.3-1.5 and saved
as JPEG or PNG, so sizes, aspect ratios and formats vary as in a folder a user collects.
Seeded: the same command makes the same set.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("clothing", type=Path)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    for split, n in (("train", args.per_class), ("validation", 10**9)):
        for cls in (args.a, args.b):
            dest = args.out / split / cls
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted((args.clothing / split / cls).glob("*.jpg"))[:n]:
                im = Image.open(f).convert("RGB")
                w, h = im.size
                cw, ch = int(w * rng.uniform(0.7, 1)), int(h * rng.uniform(0.6, 1))
                x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
                im = im.crop((x0, y0, x0 + cw, y0 + ch))
                s = rng.uniform(0.3, 1.5)
                im = im.resize((max(16, int(cw * s)), max(16, int(ch * s))))
                im.save(dest / (f.stem + rng.choice([".jpg", ".png"])))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
