"""A PEFT LoRA adapter as a llama.cpp GGUF LoRA adapter (``llama-server -m BASE.gguf --lora ADAPTER.gguf``).

Why this exists: llama.cpp serves the shipped trained preset as its base GGUF (the Q4_K_M file from PyPI) plus
this adapter, applied at run time: no merge into the base and no re-quantisation, so the base stays the verified
file and the adapter's small deltas are not rounded away by a 4-bit quantiser.

The essentials ported from llama.cpp's ``convert_lora_to_gguf.py`` (and checked against how
``src/llama-adapter.cpp`` reads an adapter):

* keys: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``, and
  ``general.architecture`` equal to the base's (llama.cpp refuses an adapter of another architecture);
* tensors: ``<gguf name>.weight.lora_a`` is PEFT's ``lora_A`` as is (torch shape ``(r, in)``, ggml
  ``ne = [in, r]``) and ``.lora_b`` is PEFT's ``lora_B`` as is (``(out, r)``, ``ne = [r, out]``); llama.cpp
  computes ``W x + scale * B (A x)`` with ``scale = alpha / r``, ``r`` read from ``lora_b``, which is PEFT's rule;
* q/k permutation: for the ``llama`` architecture ``convert_hf_to_gguf.py`` permutes the rows of the base's
  ``q_proj``/``k_proj`` (Hugging Face's rotate-half rope layout into llama.cpp's interleaved one), so the rows of
  ``lora_B`` for q and k are permuted the same way (``LlamaModel.permute``, ``n_head_kv`` heads for k);
  ``qwen2``/``qwen3`` keep Hugging Face's layout and their tensors go in unchanged.

What cannot be expressed as plain ``alpha / r`` low-rank deltas on base tensors is refused with
:class:`~reflectagent.serving.convert.ModelPreparationError`: DoRA, ``modules_to_save``, biases, embedding LoRAs,
other PEFT types, and architectures not in :data:`ARCHITECTURES`. rsLoRA (``alpha / sqrt(r)``) and per-module
``rank_pattern``/``alpha_pattern`` are converted by folding the difference from llama.cpp's ``alpha / r`` into
``lora_B``.

Only numpy and ``gguf`` are needed (no torch): the safetensors file is read directly.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reflectagent.serving.convert import ModelPreparationError

logger = logging.getLogger(__name__)

#: Architectures this converter knows, and whether ``convert_hf_to_gguf.py`` permutes their q/k rows.
#: Another architecture may transform the tensors a LoRA targets (permute, split, fuse) in ways a
#: verbatim copy would get silently wrong; add it here only after checking its ``modify_tensors``.
ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False, "qwen3": False}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_OUT_TYPES = {"f32": np.float32, "f16": np.float16}


@dataclass(frozen=True)
class BaseModel:
    """What the conversion needs from the base GGUF: names, head counts and (optionally) tensor shapes."""

    arch: str
    n_blocks: int
    n_head: int | None = None
    n_head_kv: int | None = None
    #: ggml shape (``ne``: input size first) of each base tensor; empty: shapes are not checked against the base.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def read_base(base_gguf: Path) -> BaseModel:
    """Architecture, block count, head counts and tensor shapes from a base GGUF's metadata (no weights read).

    gguf-py parses every key, the tokenizer's vocabulary included (seconds for a 150k vocabulary), so the answer
    is kept per file (path, size and modification time).
    """
    try:
        stat = Path(base_gguf).stat()
    except OSError as exc:
        raise ModelPreparationError(f"cannot read the base GGUF {base_gguf}: {exc}") from exc
    return _read_base(Path(base_gguf).resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_base(base_gguf: Path, size: int, mtime_ns: int) -> BaseModel:
    import gguf

    try:
        reader = gguf.GGUFReader(base_gguf)
    except (OSError, ValueError) as exc:
        raise ModelPreparationError(f"cannot read the base GGUF {base_gguf}: {exc}") from exc

    def value(key: str):
        found = reader.get_field(key)
        return None if found is None else found.contents()

    arch = value("general.architecture")
    if not arch:
        raise ModelPreparationError(f"{base_gguf} has no general.architecture: is it a model GGUF?")
    n_blocks = value(f"{arch}.block_count")
    if n_blocks is None:
        raise ModelPreparationError(f"{base_gguf} has no {arch}.block_count")
    n_head = _one(value(f"{arch}.attention.head_count"))
    n_head_kv = _one(value(f"{arch}.attention.head_count_kv")) or n_head
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    return BaseModel(
        arch=str(arch),
        n_blocks=int(n_blocks),
        n_head=n_head,
        n_head_kv=n_head_kv,
        shapes=shapes,
    )


def _one(value) -> int | None:
    """A head count, which some architectures give per layer: one value, or None where the layers differ."""
    if isinstance(value, list):
        return int(value[0]) if value and len(set(value)) == 1 else None
    return None if value is None else int(value)


def peft_to_gguf_lora(adapter_dir: Path, base_gguf: Path, out: Path, *, outtype: str = "f32") -> Path:
    """Convert the PEFT adapter in ``adapter_dir`` for the base ``base_gguf`` into a GGUF LoRA at ``out``.

    The architecture, block and head counts come from the base GGUF's metadata, and every adapter tensor is
    checked against the base tensor it modifies (a wrong base is refused here, not by ``llama-server``).
    """
    _read_config(Path(adapter_dir))  # refuse a bad adapter before reading the base
    return convert_peft_lora(Path(adapter_dir), read_base(Path(base_gguf)), Path(out), outtype=outtype)


def peft_to_gguf_lora_for(
    adapter_dir: Path,
    out: Path,
    *,
    arch: str,
    n_blocks: int,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    outtype: str = "f32",
) -> Path:
    """:func:`peft_to_gguf_lora` without the base file: its architecture and counts given explicitly.

    ``n_head``/``n_head_kv`` are needed only for an architecture whose q/k rows are permuted (``llama``).
    Shapes are not checked against a base.
    """
    base = BaseModel(arch=arch, n_blocks=n_blocks, n_head=n_head, n_head_kv=n_head_kv or n_head)
    return convert_peft_lora(Path(adapter_dir), base, Path(out), outtype=outtype)


def convert_peft_lora(adapter_dir: Path, base: BaseModel, out: Path, *, outtype: str = "f32") -> Path:
    """Write the GGUF LoRA for ``base`` (see the module docstring); it lands atomically at ``out``."""
    import gguf

    if outtype not in _OUT_TYPES:
        raise ModelPreparationError(f"outtype {outtype!r} is not one of {sorted(_OUT_TYPES)}")
    config = _read_config(adapter_dir)
    permute_qk = _check_arch(base)
    tensors = _adapter_tensors(adapter_dir / ADAPTER_WEIGHTS)
    alpha = float(config["lora_alpha"])
    name_map = gguf.get_tensor_name_map(_arch_enum(base.arch), base.n_blocks)

    written: list[tuple[str, np.ndarray]] = []
    for module in sorted(tensors, key=_natural):
        a, b = tensors[module]
        target = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ModelPreparationError(
                f"{adapter_dir}: module {module!r} has no llama.cpp tensor in the {base.arch} architecture "
                f"(gguf-py maps none): train the adapter without it (target_modules={config.get('target_modules')})"
            )
        _check_shapes(adapter_dir, module, target, a, b, base)
        factor = _scale_factor(config, module, rank=a.shape[0])
        if factor != 1.0:
            b = b * factor
        if permute_qk and module.endswith(("q_proj", "k_proj")):
            n_head = base.n_head if module.endswith("q_proj") else base.n_head_kv
            b = _permute_rows(b, n_head, module)
        written.append((target + ".lora_a", a))
        written.append((target + ".lora_b", b))

    partial = out.with_suffix(".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = _OUT_TYPES[outtype]
    logger.info("converting %s (%d modules, r=%s) -> %s for %s", adapter_dir, len(tensors), config["r"], out, base.arch)
    try:
        writer = gguf.GGUFWriter(partial, base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.name)
        tokens = config.get("alora_invocation_tokens")
        if tokens:
            writer.add_key_value(
                gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS,
                [int(t) for t in tokens],
                gguf.GGUFValueType.ARRAY,
                gguf.GGUFValueType.UINT32,
            )
        for name, data in written:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%d tensors, alpha=%s)", out, len(written), alpha)
    return out


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.exists() or not (adapter_dir / ADAPTER_WEIGHTS).exists():
        raise ModelPreparationError(
            f"{adapter_dir} is not a PEFT adapter folder with safetensors weights "
            f"(needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; re-save it with save_pretrained(safe_serialization=True))"
        )
    config = json.loads(path.read_text())
    refusals = {
        "peft_type": (config.get("peft_type", "LORA") != "LORA", "only plain LoRA converts: train with peft_type LORA"),
        "use_dora": (config.get("use_dora"), "llama.cpp has no DoRA: train with use_dora=False"),
        "modules_to_save": (
            config.get("modules_to_save"),
            "llama.cpp adapters carry no full module copies: train without modules_to_save (or merge instead)",
        ),
        "bias": (
            config.get("bias", "none") != "none" or config.get("lora_bias"),
            "llama.cpp adapters carry no biases: train with bias='none' and lora_bias=False",
        ),
        "fan_in_fan_out": (config.get("fan_in_fan_out"), "transposed (Conv1D) weights do not map: use a Linear model"),
        "layer_replication": (config.get("layer_replication"), "replicated layers do not exist in the base GGUF"),
        "trainable_token_indices": (config.get("trainable_token_indices"), "trained token rows do not convert"),
        "target_parameters": (config.get("target_parameters"), "LoRA on raw parameters does not convert"),
        "use_qalora": (config.get("use_qalora"), "QALoRA does not convert: train with use_qalora=False"),
        "invocation_string": (
            config.get("invocation_string") and not config.get("alora_invocation_tokens"),
            "give alora_invocation_tokens (token ids) instead of an invocation_string",
        ),
    }
    for key, (bad, advice) in refusals.items():
        if bad:
            raise ModelPreparationError(f"{adapter_dir}: {key}={config.get(key)!r} cannot become a GGUF LoRA: {advice}")
    if not config.get("r") or not config.get("lora_alpha") or float(config["lora_alpha"]) <= 0:
        raise ModelPreparationError(f"{adapter_dir}: {ADAPTER_CONFIG} needs a positive r and lora_alpha")
    return config


def _check_arch(base: BaseModel) -> bool:
    if base.arch not in ARCHITECTURES:
        raise ModelPreparationError(
            f"the base GGUF's architecture {base.arch!r} is not one this converter checked "
            f"({', '.join(sorted(ARCHITECTURES))}): serve a merged model instead, or add it to "
            "reflectagent.serving.gguf_lora.ARCHITECTURES after checking how convert_hf_to_gguf.py transforms it"
        )
    permute = ARCHITECTURES[base.arch]
    if permute and not (base.n_head and base.n_head_kv):
        raise ModelPreparationError(f"{base.arch} needs the head counts (n_head, n_head_kv) to permute q/k")
    return permute


def _arch_enum(arch: str):
    import gguf

    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise ModelPreparationError(f"the installed gguf package does not know the architecture {arch!r}: upgrade gguf")


def _adapter_tensors(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``module -> (A, B)`` in float32, refusing any tensor that is not a LoRA A or B of a linear layer."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, array in _read_safetensors(path).items():
        match = _KEY.match(key)
        if match is None:
            raise ModelPreparationError(f"{path.parent}: tensor {key!r} is not a LoRA A/B weight: {_advice(key)}")
        parts.setdefault(match["module"], {})[match["part"]] = array
    if not parts:
        raise ModelPreparationError(f"{path} holds no LoRA tensors")
    pairs = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ModelPreparationError(f"{path.parent}: {module} has lora_{''.join(ab)} only; re-save the adapter")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def _advice(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude; llama.cpp has no DoRA: train with use_dora=False"
    if "lora_embedding" in key:
        return "an embedding LoRA; target linear layers only (not embed_tokens)"
    if key.endswith(".bias"):
        return "a bias; train with bias='none' and lora_bias=False"
    if "modules_to_save" in key or key.endswith(".weight"):
        return "a full module copy (modules_to_save?); train without it"
    return "train the adapter on linear layers with plain LoRA"


def _check_shapes(adapter_dir: Path, module: str, target: str, a: np.ndarray, b: np.ndarray, base: BaseModel) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ModelPreparationError(
            f"{adapter_dir}: {module} has A {a.shape} and B {b.shape}, not (r, in) and (out, r)"
        )
    if not base.shapes:
        return
    if target not in base.shapes:
        raise ModelPreparationError(
            f"{adapter_dir}: {module} targets {target}, which the base GGUF does not have "
            "(tied embeddings?): train the adapter without it, or check the base"
        )
    # ggml ne of a linear weight is [in, out].
    want = base.shapes[target][:2]
    if (a.shape[1], b.shape[0]) != tuple(want):
        raise ModelPreparationError(
            f"{adapter_dir}: {module} is {a.shape[1]} -> {b.shape[0]} but the base's {target} is {want[0]} -> "
            f"{want[1]}: the adapter was trained on another base model"
        )


def _scale_factor(config: dict, module: str, rank: int) -> float:
    """What to multiply ``lora_B`` by so llama.cpp's ``lora_alpha / r`` gives PEFT's scale for ``module``."""
    alpha = float(config["lora_alpha"])
    module_alpha = float(
        config.get("alpha_pattern", {}).get(_pattern_key(config.get("alpha_pattern", {}), module), alpha)
    )
    peft_scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return peft_scale / (alpha / rank)


def _pattern_key(patterns: dict, module: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module's name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _permute_rows(b: np.ndarray, n_head: int | None, module: str) -> np.ndarray:
    """``LlamaModel.permute`` on B's rows (Hugging Face's rotate-half order into llama.cpp's interleaved one)."""
    if not n_head or b.shape[0] % (2 * n_head):
        raise ModelPreparationError(f"{module}: {b.shape[0]} rows do not split into {n_head} heads to permute")
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as float32 numpy arrays (bf16 included, which numpy cannot hold) without torch."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        start = 8 + size
        data = f.read()
    arrays = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        if info["dtype"] == "BF16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _DTYPES:
            array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise ModelPreparationError(f"{path}: tensor {key!r} is {info['dtype']}, not a float type")
        arrays[key] = array.astype(np.float32).reshape(info["shape"])
    logger.debug("read %d tensors from %s (header %d bytes)", len(arrays), path, start)
    return arrays
