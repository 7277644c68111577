"""Where reflectagent keeps files: one user cache root, overridable by environment; and where the
labelled pair files live (the data folder), a setting of its own."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import platformdirs

from reflectagent.errors import ReflectAgentError

DATA_DIR_ENV = "REFLECTAGENT_DATA_DIR"
PACKAGE_DATA = Path(__file__).parent / "data"  # shipped with the package: the sample pairs, the tuned presets' adapters


class DataDirError(ReflectAgentError):
    """No data folder: the variable names no folder, or there is no default for this install."""


def cache_root() -> Path:
    """``$REFLECTAGENT_HOME`` or the platform's user cache folder."""
    return Path(os.environ.get("REFLECTAGENT_HOME") or platformdirs.user_cache_dir("reflectagent"))


def models_dir() -> Path:
    return cache_root() / "models"


def judgments_dir() -> Path:
    return Path(os.environ.get("REFLECTAGENT_CACHE_DIR") or cache_root() / "judgments")


def server_dir() -> Path:
    """Server logs, vLLM caches and the state file of ``reflectagent serve``."""
    return Path(os.environ.get("REFLECTAGENT_SERVER_DIR") or cache_root() / "server")


def source_checkout() -> Path | None:
    """The folder reflectagent was installed from in development mode (``pip install -e``), as the installed
    distribution records it; None for an ordinary install, where no source folder is meant to stay behind."""
    for dist in metadata.distributions(
        name="reflectagent"
    ):  # a checkout's own *.egg-info can come first: it has no record
        try:
            record = json.loads(dist.read_text("direct_url.json") or "null")
        except ValueError:
            continue
        if isinstance(record, dict) and (record.get("dir_info") or {}).get("editable"):
            url = urlparse(str(record.get("url", "")))
            if url.scheme == "file":
                return Path(unquote(url.path))
    return None


def data_dir() -> Path:
    """The folder of labelled pair files (``pandalm.jsonl``, ``hhh_alignment.jsonl``, ...) that defaults such as
    the fine-tuning loop's ``train_data`` name: ``$REFLECTAGENT_DATA_DIR``; by default, in a source checkout,
    the ``shared/data`` folder beside it. An ordinary install has no default: that is an error saying so."""
    named = os.environ.get(DATA_DIR_ENV)
    if named:
        folder = Path(named).expanduser()
        if not folder.is_dir():
            raise DataDirError(
                f"${DATA_DIR_ENV}={named} is not a folder: point it at the folder of labelled pair files"
            )
        return folder
    checkout = source_checkout()
    if checkout is not None and (checkout.parent / "shared" / "data").is_dir():
        return checkout.parent / "shared" / "data"
    where = f"{checkout} has no ../shared/data beside it" if checkout else "this install is not a source checkout"
    raise DataDirError(
        f"no data folder ({where}): set ${DATA_DIR_ENV} to the folder of labelled pair files, "
        "or name the files themselves"
    )
