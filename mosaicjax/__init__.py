"""mosaicjax: pre-train, fine-tune, evaluate and serve DBRX-style MoE LLMs and SD-style image models in JAX."""

__version__ = "0.1.0"

__all__ = ["__version__"]
