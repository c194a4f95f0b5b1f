"""mosaicjax: pre-train, fine-tune, evaluate and serve DBRX-style MoE LLMs and SD-style image models in JAX."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_lm", "load_image_pipeline"]


def load_lm(path, dtype="float32", mesh=None, **kwargs):
    """A LanguageModel from a HF DBRX folder, a mosaicjax checkpoint or a training workdir (see
    mosaicjax.checkpoints.loading.load_lm). Imported on first call so `import mosaicjax` stays light."""
    from mosaicjax.checkpoints import loading  # pylint: disable=import-outside-toplevel
    return loading.load_lm(path, dtype=dtype, mesh=mesh, **kwargs)


def load_image_pipeline(path, dtype="float32", mesh=None):
    """An ImagePipeline (SD1/SD2/SDXL text-to-image) from a diffusers folder or a mosaicjax image checkpoint (see
    mosaicjax.diffusion.pipeline). Imported on first call so `import mosaicjax` stays light."""
    from mosaicjax.diffusion import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.load_image_pipeline(path, dtype=dtype, mesh=mesh)
