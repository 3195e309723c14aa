"""Write scikit-learn's bundled handwritten digits as an ImageFolder with train/ and val/.

The 1,797 images are real 8×8 scans (UCI optical digits) that ship inside scikit-learn, so nothing is
downloaded. Each class is split with a fixed seed; the folder is built aside and renamed into place,
and an existing folder is never overwritten.

    python scripts/make_digits.py data/digits
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing kd
from kd.files import written_atomically  # noqa: E402


def write_digits(out: Path, val_fraction: float = 0.25, seed: int = 0) -> tuple[int, int]:
    """Write the digits under ``out``; returns the number of training and validation images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 17 grey levels → 0..255
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(out) as tmp:
        for label in range(10):
            indices = rng.permutation(np.flatnonzero(digits.target == label))
            n_val = round(len(indices) * val_fraction)
            for split, chosen in (("val", indices[:n_val]), ("train", indices[n_val:])):
                folder = tmp / split / str(label)
                folder.mkdir(parents=True)
                for index in chosen:
                    Image.fromarray(images[index], mode="L").save(folder / f"{index:04d}.png")
                counts[split] += len(chosen)
    return counts["train"], counts["val"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("data/digits"), help="folder to create")
    parser.add_argument("--val_fraction", type=float, default=0.25, help="share of each class held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists already; remove it or choose another folder", file=sys.stderr)
        return 2
    try:
        train, val = write_digits(args.out, args.val_fraction, args.seed)
    except ImportError:
        print("error: scikit-learn is needed for the digits: pip install scikit-learn", file=sys.stderr)
        return 2
    print(f"wrote {train} training and {val} validation images of 10 classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
