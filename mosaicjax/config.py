"""Gin experiment configs: parse files and bindings, fail early with a fix, record the operative config.

Every gin-configurable of the framework lives in a module imported by `register_configurables`, so gin knows every
name before it parses anything: a misspelt configurable or parameter fails at parse time, before any device work,
with the closest valid names suggested.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import re
from typing import Iterable, Sequence

import gin

# Modules that declare gin configurables. Imported (not just named) before parsing so their names are registered.
_CONFIGURABLE_MODULES = (
    "mosaicjax.parallel.mesh",
    "mosaicjax.parallel.rules",
    "mosaicjax.models.dbrx",
    "mosaicjax.data.pipeline",
    "mosaicjax.data.tokenizers",
    "mosaicjax.trainer.config",
    "mosaicjax.trainer.optimizer",
    "mosaicjax.trainer.checkpointing",
    "mosaicjax.trainer.metrics",
    "mosaicjax.data.images",  # image task (issue 5): image_data, diffusion, image
    "mosaicjax.diffusion.training",
    "mosaicjax.trainer.tasks.image",
)

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


class ConfigError(ValueError):
    """A configuration problem, reported before any compilation with the binding at fault and the fix."""


def register_configurables() -> None:
    for name in _CONFIGURABLE_MODULES:
        importlib.import_module(name)


def _registry() -> dict[str, object]:
    """Maps each registered configurable name to its callable (gin has no public listing API)."""
    out = {}
    for selector, configurable in gin.config._REGISTRY.items():  # pylint: disable=protected-access
        name = selector.split(".")[-1]
        out[name] = configurable.wrapped
    return out


def _params_of(fn) -> list[str]:
    try:
        return [p for p in inspect.signature(fn).parameters if p != "self"]
    except (TypeError, ValueError):
        return []


def _suggest(err: ValueError) -> str:
    """Turns gin's error into one that names the fix: the closest valid configurable or parameter."""
    msg = str(err)
    registry = _registry()
    m = re.search(r"No configurable matching '([^']+)'", msg)
    if m:
        wanted = m.group(1).split(".")[-1]
        close = difflib.get_close_matches(wanted, list(registry), n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else (
            "known configurables: " + ", ".join(sorted(registry)))
        return f"Unknown configurable '{m.group(1)}': {hint}\n{msg}"
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg)
    if m:
        cname, pname = m.group(1), m.group(2)
        params = _params_of(registry.get(cname.split(".")[-1]))
        close = difflib.get_close_matches(pname, params, n=3)
        hint = (f"did you mean {', '.join(f'{cname}.{c}' for c in close)}?" if close
                else f"valid parameters: {', '.join(params)}")
        return f"Unknown parameter '{cname}.{pname}': {hint}\n{msg}"
    return msg


def parse(gin_files: Sequence[str], gin_params: Iterable[str] = ()) -> None:
    """Parses gin files (which may `include` each other) then bindings; raises ConfigError naming the fix."""
    register_configurables()
    gin.clear_config()
    for path in [EXPERIMENTS_DIR, os.path.dirname(EXPERIMENTS_DIR), os.getcwd()]:
        gin.add_config_file_search_path(path)
    for f in gin_files:
        if not os.path.exists(f) and not os.path.exists(os.path.join(os.path.dirname(EXPERIMENTS_DIR), f)):
            raise ConfigError(f"--gin_file={f}: no such file (paths are relative to the current directory or "
                              f"to the repository root; experiments live in {EXPERIMENTS_DIR})")
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_params), finalize_config=False)
    except ValueError as e:
        raise ConfigError(_suggest(e)) from None
    except (SyntaxError, gin.config_parser.ParseError if hasattr(gin, "config_parser") else SyntaxError) as e:
        raise ConfigError(f"Could not parse the gin config: {e}") from None


@contextlib.contextmanager
def overridden(bindings: Iterable[str]):
    """The current config with `bindings` parsed after it (one phase of a multi-phase run); restored on exit.

    Both ends start from a cleared gin state, so each phase's operative config (its config.gin) holds only what
    that phase used.
    """
    saved = gin.config_str()
    gin.clear_config()
    try:
        gin.parse_config(saved)
        gin.parse_config(list(bindings))
    except ValueError as e:
        gin.clear_config()
        gin.parse_config(saved)
        raise ConfigError(_suggest(e)) from None
    try:
        yield
    finally:
        gin.clear_config()
        gin.parse_config(saved)


def operative_config() -> str:
    """Every binding in effect (including defaults that were used), as gin text a later run can re-read."""
    text = gin.operative_config_str()
    return text if text.strip() else gin.config_str()


def write_config(workdir: str, text: str | None = None) -> str:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.gin")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text if text is not None else gin.config_str())
    os.replace(tmp, path)
    return path
