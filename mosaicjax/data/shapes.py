"""A procedurally generated text-to-image data set: one coloured shape on a white background, with its caption.

    "a large red circle at the top on a white background"

Every record is a pure function of its index (colour, shape, size, position and a little jitter drawn from a
seeded generator), so the set needs no files, is identical on every machine and process, and is random access
(a grain data source). Some (colour, shape, position) combinations are held out of training (`held_out`), so the
quickstart can sample prompts the model never saw and measure prompt adherence (mosaicjax/diffusion/shapes_eval.py).
"""
from __future__ import annotations

import zlib

import numpy as np

# Saturated, well-separated colours (RGB 0-255) so the evaluator can name a generated colour unambiguously.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.28, "large": 0.5}  # side of the shape's box as a fraction of the image side
POSITIONS = {"center": (0.5, 0.5), "left": (0.5, 0.3), "right": (0.5, 0.7), "top": (0.3, 0.5),
             "bottom": (0.7, 0.5)}  # (row, column) of the shape's centre, fractions of the image side


def caption(color: str, shape: str, size: str, position: str) -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {size} {color} {shape} {where} on a white background"


def held_out(color: str, shape: str, position: str) -> bool:
    """One (colour, shape, position) combination in ~7 is never trained on (crc32 of the names)."""
    return zlib.crc32(f"{color}/{shape}/{position}".encode()) % 7 == 0


def all_combinations():
    for color in COLORS:
        for shape in SHAPES:
            for size in SIZES:
                for position in POSITIONS:
                    yield color, shape, size, position


def render(color: str, shape: str, size: str, position: str, side: int, rng: np.random.Generator | None = None
           ) -> np.ndarray:
    """uint8 [side, side, 3]: the shape (jittered by up to 4% of the side when rng is given) on white."""
    img = np.full((side, side, 3), 255, np.uint8)
    r = SIZES[size] * side / 2  # half the shape's box
    cy, cx = (np.array(POSITIONS[position]) * side)
    if rng is not None:
        cy, cx = cy + rng.uniform(-0.04, 0.04) * side, cx + rng.uniform(-0.04, 0.04) * side
    yy, xx = np.mgrid[0:side, 0:side] + 0.5  # pixel centres  # [side, side] each
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    elif shape == "square":
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    elif shape == "triangle":  # apex up: the row's half-width grows linearly from 0 at the top to r at the base
        t = (yy - (cy - r)) / (2 * r)
        mask = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    img[mask] = COLORS[color]
    return img


class ShapesSource:
    """grain random-access source of {'image': uint8 [side, side, 3], 'caption': str, 'name': str}.

    split 'train' draws only training combinations, 'held_out' only held-out ones; `num_records` per split.
    """

    def __init__(self, num_records: int = 4096, side: int = 32, split: str = "train", seed: int = 0):
        combos = [c for c in all_combinations() if held_out(c[0], c[1], c[3]) == (split == "held_out")]
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        self.combos, self.num_records, self.side, self.seed = combos, int(num_records), int(side), int(seed)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rng = np.random.default_rng([self.seed, index])
        color, shape, size, position = self.combos[index % len(self.combos)]
        return {"image": render(color, shape, size, position, self.side, rng),
                "caption": caption(color, shape, size, position), "name": f"shapes[{index}]"}

    def size_of(self, index: int) -> tuple[int, int]:
        """(height, width) without rendering (for bucketing)."""
        return self.side, self.side

    def __repr__(self):
        return f"ShapesSource({self.num_records} records, {self.side}px)"


def held_out_prompts(limit: int | None = None) -> list[tuple[str, dict]]:
    """(prompt, attributes) for every held-out combination (both sizes), in a fixed order."""
    out = []
    for color, shape, size, position in all_combinations():
        if held_out(color, shape, position):
            out.append((caption(color, shape, size, position),
                        {"color": color, "shape": shape, "size": size, "position": position}))
    return out[:limit] if limit else out
