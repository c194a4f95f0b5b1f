"""/v1/images/generations through the openai client: negative prompt, seed -> same bytes, n, sizes."""
import base64
import concurrent.futures as cf
import io

import numpy as np
import openai
import pytest
from openai.types import ImagesResponse

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_common import IMAGE_NAME  # noqa: E402  pylint: disable=wrong-import-position


def _gen(client, **kw):
    extra = {"negative_prompt": kw.pop("negative_prompt", None), "seed": kw.pop("seed", None),
             "num_inference_steps": 2, "guidance_scale": 5.0}
    return client.images.generate(model=IMAGE_NAME, prompt=kw.pop("prompt", "a red fox in snow"),
                                  size=kw.pop("size", "32x32"), response_format="b64_json",
                                  extra_body={k: v for k, v in extra.items() if v is not None}, **kw)


def test_images_seed_negative_prompt(client, image_pipe):
    a = _gen(client, negative_prompt="blurry", seed=57)
    ImagesResponse.model_validate(a.model_dump(mode="json", exclude_unset=True), strict=True)
    b = _gen(client, negative_prompt="blurry", seed=57)
    assert a.data[0].b64_json == b.data[0].b64_json  # same seed, same bytes
    c = _gen(client, negative_prompt="blurry", seed=58)
    assert c.data[0].b64_json != a.data[0].b64_json
    d = _gen(client, negative_prompt="watermark, text", seed=57)
    assert d.data[0].b64_json != a.data[0].b64_json  # the negative prompt is used
    from PIL import Image
    img = Image.open(io.BytesIO(base64.b64decode(a.data[0].b64_json)))
    assert img.format == "PNG" and img.size == (32, 32)
    # Equals the pipeline called directly with the same seed.
    want = image_pipe("a red fox in snow", negative_prompt="blurry", size="32x32", num_inference_steps=2,
                      guidance_scale=5.0, seed=57, output_type="np")
    np.testing.assert_array_equal(np.asarray(img), (want[0] * 255).round().astype(np.uint8))


def test_images_n_and_concurrent_batching(client):
    r = _gen(client, n=2, seed=3)
    assert len(r.data) == 2 and r.data[0].b64_json != r.data[1].b64_json
    with cf.ThreadPoolExecutor(3) as ex:
        outs = list(ex.map(lambda s: _gen(client, seed=s).data[0].b64_json, [11, 12, 13]))
    assert len(set(outs)) == 3


@pytest.mark.parametrize("size", ["33x32", "128x128", "big", "0x32"])
def test_images_bad_size(client, size):
    with pytest.raises(openai.BadRequestError) as e:
        _gen(client, size=size, seed=1)
    assert e.value.body["param"] == "size"
