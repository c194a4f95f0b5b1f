"""OpenAI-compatible serving: request models, the continuous-batching engine, the image batcher, the FastAPI app.

    app = serving.create_app({'dbrx': mosaicjax.load_lm(path), 'sd': mosaicjax.load_image_pipeline(path2)})

`python -m mosaicjax.serve --model=NAME=PATH ...` wraps it (mosaicjax/serve.py).
"""
from mosaicjax.serving.app import create_app

__all__ = ["create_app"]
