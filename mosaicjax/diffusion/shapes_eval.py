"""Prompt adherence on the shapes data set: does a generated image show the prompt's colour and shape?

The evaluator reads an image the way the data set draws it: pixels far from white are the shape; their mean
colour is named by the nearest palette colour (mosaicjax/data/shapes.py COLORS), and the shape's kind follows from
how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2). It is exact on the data set's own
32px renders (tests check that), so its score on generated images measures the model, not the evaluator.
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
    # Thresholds rather than nearest fill: a small pixelated circle loses only its corners (fill ~0.94).
    shape = "square" if fill > 0.97 else ("circle" if fill > 0.66 else "triangle")
    return {"color": color, "shape": shape, "fill": fill, "pixels": int(mask.sum())}


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
