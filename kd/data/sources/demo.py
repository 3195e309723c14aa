"""The demo dataset: shapes in colours, generated once as an ImageFolder of PNGs.

Classes that share a shape or a near hue look alike, so a teacher's soft targets carry which classes
resemble one another, the case distillation is for.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kd.errors import KDError
from kd.files import remove_dead_temporaries, written_atomically

DEMO_SHAPES = ("circle", "ring", "square", "triangle")
DEMO_HUES = {"red": 0.0, "orange": 0.07, "blue": 0.6}
DEMO_VERSION = 1


def _draw_demo_image(shape: str, hue: float, size: int, rng: np.random.Generator) -> Image.Image:
    """One noisy picture of a coloured shape at a random place and scale."""
    base = rng.uniform(0.25, 0.75, 3) * 255
    smooth = np.kron(rng.normal(0, 30, (5, 5, 3)), np.ones((size // 5 + 1, size // 5 + 1, 1)))[:size, :size]
    pixels = np.clip(base + smooth + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    colour = colorsys.hsv_to_rgb((hue + rng.normal(0, 0.03)) % 1.0, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    fill = tuple(int(c * 255) for c in colour)
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 2.5)))
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _params(marker: Path) -> dict | None:
    """The settings a complete demo dataset was generated with (its ``demo.json``); None if missing or damaged."""
    try:
        return json.loads(marker.read_bytes())
    except (OSError, ValueError):  # not there, a folder, not JSON, not UTF-8
        return None


def make_demo_dataset(root: str | Path, train_per_class: int = 80, val_per_class: int = 50,
                      image_size: int = 40, seed: int = 0) -> Path:
    """Write the demo ImageFolder (train/ and val/ of PNGs) under ``root`` once; reuse it after.

    The images are a pure function of the arguments. The folder is built beside ``root`` and renamed
    into place when complete, so an interrupted generation never leaves a partial dataset behind (and the
    next call removes what a killed one left aside).
    """
    root = Path(root)
    remove_dead_temporaries(root.parent, root.name, "demo dataset")
    params = {"version": DEMO_VERSION, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "image_size": image_size, "seed": seed}
    marker = root / "demo.json"
    if _params(marker) == params:
        return root
    if root.exists():
        raise KDError(f"--data_dir demo: {root} exists but is not this demo dataset; move it away")
    classes = [f"{colour}_{shape}" for colour in DEMO_HUES for shape in DEMO_SHAPES]
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        with written_atomically(root) as tmp:
            for split, count, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
                for label, name in enumerate(classes):
                    folder = tmp / split / name
                    folder.mkdir(parents=True)
                    colour, shape = name.split("_")
                    rng = np.random.default_rng([split_seed, label])
                    for i in range(count):
                        _draw_demo_image(shape, DEMO_HUES[colour], image_size, rng).save(folder / f"{i:04d}.png")
            (tmp / "demo.json").write_text(json.dumps(params))
    except OSError as exc:  # another process (a DDP rank) finished the same dataset first, or a disk problem
        if _params(marker) != params:
            raise KDError(f"--data_dir demo: cannot write the demo dataset to {root} (under --output_dir): "
                          f"{exc.strerror or exc}") from None
    return root
