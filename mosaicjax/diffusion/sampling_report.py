"""End-of-run samples of an image training: a PNG grid of prompts and, on the shapes data, prompt adherence."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np


def save_grid(images: np.ndarray, path: str, columns: int = 8) -> str:
    """images float [N, H, W, 3] in [0, 1] -> one PNG grid (2px white gutters)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    n, h, w, _ = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 2), cols * (w + 2), 3), np.float32)  # [rows*(h+2), cols*(w+2), 3]
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
    return path


def sample_and_report(task, workdir: str, state, is_primary: bool) -> dict:
    """Samples the task's prompts with the EMA weights; writes samples/step_N.png and samples/report.json."""
    from mosaicjax.data import shapes as shapes_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.diffusion import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.diffusion import shapes_eval  # pylint: disable=import-outside-toplevel
    cfg = task.cfg
    attrs = None
    if cfg.sample_prompts:
        prompts = list(cfg.sample_prompts)[:cfg.num_samples]
    elif task.data_cfg.source == "shapes":
        # The held-out prompts in turn, as many times as num_samples asks (each repeat from other noise).
        held = shapes_lib.held_out_prompts()
        held = [held[i % len(held)] for i in range(cfg.num_samples)]
        prompts, attrs = [p for p, _ in held], [a for _, a in held]
    else:
        return {}
    pipe = pipeline_lib.ImagePipeline(task.image_model(workdir, state))
    side = task.data_cfg.resolution
    images = []
    chunk_size = 16
    for i in range(0, len(prompts), chunk_size):
        chunk = prompts[i:i + chunk_size]
        images.append(pipe(chunk, height=side, width=side, num_inference_steps=cfg.sample_steps,
                           guidance_scale=cfg.guidance_scale, seed=task.train_cfg.seed + i // chunk_size,
                           scheduler=cfg.sample_scheduler, output_type="np"))
    images = np.concatenate(images)  # [N, side, side, 3] in [0, 1]
    report = {"step": int(np.asarray(state.step)), "prompts": prompts}
    if attrs is not None:
        report.update(shapes_eval.adherence(images, attrs))
        report["images"] = [{"prompt": p, "want": [a["color"], a["shape"]],
                             "got": [got["color"], got["shape"]]}
                            for p, a, got in zip(prompts, attrs, map(shapes_eval.classify, images))]
    if is_primary:
        out = os.path.join(workdir, "samples")
        os.makedirs(out, exist_ok=True)
        report["grid"] = save_grid(images, os.path.join(out, f"step_{report['step']}.png"))
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        msg = f"samples: {report['grid']}"
        if attrs is not None:
            msg += (f"; prompt adherence on {len(attrs)} held-out prompts: colour {report['color_accuracy']:.0%}, "
                    f"shape {report['shape_accuracy']:.0%}")
        print(msg, file=sys.stderr, flush=True)
    return report
