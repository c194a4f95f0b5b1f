"""/v1/images/generations for one ImagePipeline: concurrent requests of one shape share one compiled call.

A worker task drains the waiting requests, groups them by everything the compiled program depends on (size,
steps, scheduler, guidance scale, negative prompt given or not) and runs each group as one pipeline call: the
prompts (each repeated n times), their negative prompts, and each request's own initial noise. The noise is
drawn exactly as ImagePipeline draws it for a lone call (jax.random.normal(key(seed), [n, C, h, w]) on the host),
so a request's images depend only on its own fields. The batch is padded to a power of two (repeating the last
row) so only a few batch sizes are ever compiled.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import time

import jax
import jax.numpy as jnp
import numpy as np
from openai.types import Image, ImagesResponse

from mosaicjax.diffusion import pipeline as pipeline_lib
from mosaicjax.serving import protocol
from mosaicjax.serving.errors import APIError, bad_request

log = logging.getLogger(__name__)


def png_b64(image: np.ndarray) -> str:
    """float [H, W, 3] in [0, 1] -> base64 PNG (no metadata: the same pixels give the same bytes)."""
    buf = io.BytesIO()
    pipeline_lib.to_pil(image[None])[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Job:
    def __init__(self, req: protocol.ImageGenerationRequest, key: tuple, size: tuple[int, int], seed: int):
        self.req, self.key, self.size, self.seed = req, key, size, seed
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()


class ImageService:
    """Validates requests, batches them and answers ImagesResponse objects."""

    def __init__(self, name: str, pipe, *, max_image_size: int = 1280, max_batch: int = 8, queue_size: int = 64,
                 default_steps: int = 30, metrics=None):
        self.name, self.pipe, self.metrics = name, pipe, metrics
        self.max_image_size, self.max_batch, self.queue_size = max_image_size, max_batch, queue_size
        self.default_steps = default_steps
        self._pending: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def _size(self, size: str | None) -> tuple[int, int]:
        if size is None:
            return self.pipe.default_size, self.pipe.default_size
        try:
            w, h = pipeline_lib.parse_size(size)
        except ValueError as e:
            raise bad_request(str(e), param="size") from e
        m = self.pipe.size_multiple
        named = size.strip().lower() in pipeline_lib.SIZE_PRESETS or size.strip().lower() in pipeline_lib.SIZE_ALIASES
        if w <= 0 or h <= 0 or w % m or h % m or (not named and max(w, h) > self.max_image_size):
            raise bad_request(f"size must be one of {', '.join(pipeline_lib.SIZE_PRESETS)} or 'WxH' with sides "
                              f"multiples of {m} up to {self.max_image_size}, got {size!r}", param="size")
        return w, h

    async def generate(self, req: protocol.ImageGenerationRequest) -> dict:
        if req.response_format not in (None, "b64_json"):
            raise bad_request("only response_format='b64_json' is supported", param="response_format")
        w, h = self._size(req.size)
        try:
            scheduler = self.pipe.resolve_scheduler(req.scheduler)
        except ValueError as e:
            raise bad_request(str(e), param="scheduler") from e
        steps = req.num_inference_steps or self.default_steps
        guidance = 7.5 if req.guidance_scale is None else float(req.guidance_scale)
        seed = secrets.randbits(31) if req.seed is None else int(req.seed)
        key = (w, h, steps, scheduler, guidance, req.negative_prompt is not None)
        if len(self._pending) >= self.queue_size:
            raise APIError(429, "image queue full; retry later", code="queue_full", headers={"Retry-After": "2"})
        job = _Job(req, key, (w, h), seed)
        self._pending.append(job)
        self._gauge()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.ensure_future(self._run())
        self._wake.set()
        images = await job.future
        resp = ImagesResponse(created=int(time.time()), data=[Image(b64_json=png_b64(im)) for im in images])
        return resp.model_dump(mode="json", exclude_unset=True)

    def _gauge(self):
        if self.metrics is not None:
            self.metrics.queue_depth.labels(model=self.name).set(len(self._pending))

    async def _run(self):
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(0.005)  # let requests that arrive together join one call
            first = self._pending[0]
            group, total = [], 0
            for j in list(self._pending):
                if j.key == first.key and (not group or total + j.req.n <= self.max_batch):
                    group.append(j)
                    total += j.req.n
                    self._pending.remove(j)
            self._gauge()
            try:
                images = await asyncio.to_thread(self._call, group)
            except Exception as e:  # pylint: disable=broad-except
                log.exception("image generation failed")
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in group:
                if not j.future.done():
                    j.future.set_result(images[start:start + j.req.n])
                start += j.req.n

    def _call(self, group: list[_Job]) -> np.ndarray:
        """One pipeline call for a group of same-shape jobs -> float [total, H, W, 3]."""
        w, h, steps, scheduler, guidance, has_neg = group[0].key
        pipe = self.pipe
        f = pipe.vae_scale_factor
        prompts, negatives, latents = [], [], []
        for j in group:
            prompts += [j.req.prompt] * j.req.n
            negatives += [j.req.negative_prompt or ""] * j.req.n
            shape = (j.req.n, pipe.unet_config.in_channels, h // f, w // f)
            with jax.default_device(jax.devices("cpu")[0]):
                latents.append(np.asarray(jax.random.normal(jax.random.key(j.seed), shape, jnp.float32)))
        total = len(prompts)
        padded = 1 << (total - 1).bit_length()
        pad = padded - total
        prompts += prompts[-1:] * pad
        negatives += negatives[-1:] * pad
        latents = np.concatenate(latents + [latents[-1][-1:]] * pad, axis=0)
        out = pipe(prompts, negative_prompt=negatives if has_neg else None, size=f"{w}x{h}",
                   num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler, latents=latents,
                   output_type="np")
        if self.metrics is not None:
            self.metrics.images.labels(model=self.name).inc(total)
            self.metrics.image_batch.labels(model=self.name).observe(total)
        return np.asarray(out)[:total]
