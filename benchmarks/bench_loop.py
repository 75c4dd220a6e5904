"""imgclf's training loop against a loop in the original study's style.

Study style: torchvision ``ImageFolder`` over JPEG files, per-image PIL transforms
(RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize), a ``DataLoader``,
fp32, default memory format. imgclf: the cached uint8 dataset, batch augmentation, and the
trainer's defaults for this hardware (``imgclf.train``). Same model, same batch size,
same images (a class-balanced subset of the shared CIFAR-10 archive).

Also reported: imgclf at the study's precision and memory format (fp32, NCHW), which
isolates what the data path alone gains.

    python benchmarks/bench_loop.py --models fast simple --images 5000
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/cifar10-train-jpg.tar.gz"


def extract_subset(archive: Path, dest: Path, per_class: int) -> Path:
    """Unpack ``per_class`` JPEGs of each class: the study read files from disk."""
    counts: dict[str, int] = {}
    with tarfile.open(archive, "r|gz") as tf:
        for m in tf:
            if not m.isfile() or not m.name.endswith(".jpg"):
                continue
            cls = m.name.split("/")[-2]
            if counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            out = dest / "train" / cls / Path(m.name).name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(m).read())
    return dest / "train"


def study_style(folder: Path, model_name: str, batch: int, workers: int) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from imgclf.models import create

    torch.manual_seed(0)
    model = create(model_name, num_classes=10)
    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(model.mean, model.std),
        ]
    )
    loader = torch.utils.data.DataLoader(
        ImageFolder(str(folder), tf), batch_size=batch, shuffle=True, num_workers=workers
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    model.train()
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def imgclf_loop(folder: Path, model_name: str, batch: int, overrides: list[str]) -> float:
    from imgclf.data.importer import import_dataset
    from imgclf.train import train

    ds = import_dataset(folder, "bench-loop", val_fraction=0.0)
    recipe = {
        "name": f"bench-{model_name}",
        "model": model_name,
        "batch_size": batch,
        "augment": {"crop_padding": 4, "flip": True},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "stages": [{"epochs": 1}],
    }
    with tempfile.TemporaryDirectory() as out:
        run = train(recipe, ds, out=Path(out) / "run", overrides=overrides, progress=False)
    return float(run.summary["images_per_second"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["fast", "simple"])
    p.add_argument("--images", type=int, default=5000, help="images (balanced over classes)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, study style")
    args = p.parse_args()
    if not ARCHIVE.is_file():
        raise SystemExit(f"{ARCHIVE} not found: this benchmark needs the shared CIFAR-10 JPEGs")
    import os

    os.environ.setdefault("IMGCLF_HOME", tempfile.mkdtemp(prefix="imgclf-bench-"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract_subset(ARCHIVE, Path(tmp), args.images // 10)
        print(
            f"# {args.images} CIFAR-10 JPEGs, batch {args.batch}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        print(
            f"{'model':<8} {'study img/s':>12} {'imgclf img/s':>13} {'ratio':>6} "
            f"{'imgclf fp32 NCHW':>17} {'ratio':>6}"
        )
        for name in args.models:
            base = study_style(folder, name, args.batch, args.workers)
            ours = imgclf_loop(folder, name, args.batch, [])
            plain = imgclf_loop(folder, name, args.batch, ["precision=fp32", "channels_last=off"])
            print(
                f"{name:<8} {base:12.1f} {ours:13.1f} {ours / base:6.2f} "
                f"{plain:17.1f} {plain / base:6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
