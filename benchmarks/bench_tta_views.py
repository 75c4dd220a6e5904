"""Accuracy of one run under test-time view weightings: no TTA, mirror, the 6 views averaged
equally (imgclf.evaluate.tta), and airbench94's weights (the unshifted pair half) over
probabilities and over logits. docs/results.md records it for the 10-epoch `fast` run.

    python benchmarks/bench_tta_views.py runs/fast-1 --data c10 --split val
"""

from __future__ import annotations

import argparse

import torch

from imgclf.evaluate.runs import open_data_for
from imgclf.evaluate.tta import _shift
from imgclf.inference.engine import label_map, run_loader
from imgclf.inference.runs import load_run

# airbench94 (legacy/airbench94.py, infer_mirror_translate): the plain view and its mirror
# weigh 1/2 together, the four shifted views the other 1/2.
AIRBENCH = {"id": 0.25, "flip": 0.25, "s-1": 0.125, "s-1f": 0.125, "s1": 0.125, "s1f": 0.125}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    args = p.parse_args()
    lr = load_run(args.run)
    ds = open_data_for(args.data, [lr])[0]
    idx = ds.indices(args.split)
    labels = label_map(lr.classes, ds)[ds.labels[idx]]
    model = lr.model.eval().to(memory_format=torch.channels_last)
    logits: dict[str, list[torch.Tensor]] = {}
    ys = []
    with torch.no_grad():
        for x, y in run_loader(lr, ds.images[idx], labels, 1000, "cpu"):
            ys.append(y)
            views = {"id": x, "flip": x.flip(-1)}
            for d in (-1, 1):
                moved = _shift(x, d, d)
                views[f"s{d}"], views[f"s{d}f"] = moved, moved.flip(-1)
            for name, v in views.items():
                logits.setdefault(name, []).append(model(v).float())
    y = torch.cat(ys)
    L = {k: torch.cat(v) for k, v in logits.items()}
    P = {k: v.softmax(1) for k, v in L.items()}

    def acc(scores: torch.Tensor) -> str:
        return f"{(scores.argmax(1) == y).float().mean().item() * 100:.2f}%"

    print(f"no TTA                      {acc(L['id'])}")
    print(f"mirror                      {acc(P['id'] + P['flip'])}")
    print(f"6 views, equal (imgclf)     {acc(sum(P.values()))}")
    print(f"6 views, airbench, probs    {acc(sum(AIRBENCH[k] * P[k] for k in P))}")
    print(f"6 views, airbench, logits   {acc(sum(AIRBENCH[k] * L[k] for k in L))}")


if __name__ == "__main__":
    main()
