"""Diffusion: samplers (schedulers.py) and the text-to-image pipeline (pipeline.py)."""
