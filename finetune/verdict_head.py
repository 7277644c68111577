"""A verdict head: the judge's "A" and "B" logits moved by a linear map of its own hidden state, fitted on frozen features.

A verdict-token judge (``direct-prob``) decides by ``logit(A) - logit(B) = (w_A - w_B) . h``, ``h`` the model's last
hidden state where the verdict letter is generated. Adding ``delta . h`` to that difference is a change to two rows of
the LM head (``w_A += delta / 2``, ``w_B -= delta / 2``): the result is a model folder like any other, served by vLLM and
judged by the same program, and it keeps the base's judgment as its offset.

Why not LoRA: on this project's 2-core CPU one LoRA step of 8 verdict rows of a 0.5B took 67-88 s, about 2.3 hours for
a fold of 480 pairs, and a leave-one-source-out protocol trains five folds per target. The head needs one forward pass
per row, no backward, and the same features serve every fold: they are computed once (:func:`extract`, resumable,
stored in shards beside the bench), after which each fold's head is a logistic regression fitted in seconds
(:func:`fit_head`). Its capacity is one vector the size of the hidden state, so it can adapt what the model already
represents about which response is better, not memorise a source's quirks.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reflectagent.adapter import JudgeAdapter
from reflectagent.pairs import Pair
from reflectagent.signatures import Analyze, Prefer
from reflectagent.steps import render_request
from reflectagent.tokens import InputBudget

logger = logging.getLogger(__name__)

# What vLLM has generated, under the JSON schema without free whitespace (``ServerSpec``), when the verdict letter
# comes next (a step's ``raw`` is '{"preference":"A"}'): the hidden state after it is the one the served model decides from.
VERDICT_PREFIX = '{"preference":"'
VERDICT_KEY = '"preference":"'  # after an analysis: '{"analysis":"...","preference":"A"}'
SHARD = 32  # rows per stored shard: a killed extraction loses at most this many forward passes


@dataclass(frozen=True)
class VerdictRow:
    """One presentation of a pair: ``label`` is 1.0 when the response shown first is the better one."""

    pair_id: str
    swapped: bool
    token_ids: tuple[int, ...]
    label: float | None

    @property
    def key(self) -> str:
        """Names the features by exactly what the model reads, so a change to the prompt recomputes them."""
        return hashlib.sha256(np.asarray(self.token_ids, dtype=np.int64).tobytes()).hexdigest()[:24]


def verdict_rows(
    pairs: Iterable[Pair],
    tokenizer,
    budget: InputBudget | int | None,
    orders: str = "both",
    adapter: JudgeAdapter | None = None,
    analyses: Mapping[tuple[str, bool], str | None] | None = None,
) -> list[VerdictRow]:
    """The token ids the served model reads before its verdict letter, for each pair in ``orders``:
    ``"both"``, or ``"one"`` (the order drawn from the pair's id, so a set's positions stay balanced).

    Without ``analyses`` that is ``direct-prob``'s request (``Prefer``). With them, ``genrm-prob``'s: the ``Analyze``
    request and what the model wrote before the letter (:func:`before_verdict` of its raw output), keyed by
    ``(pair id, swapped)``; a presentation whose analysis is missing or has no verdict gets no row."""
    adapter = adapter or JudgeAdapter()
    rows = []
    for pair in pairs:
        for swapped in shown_orders(pair, orders):
            shown = pair.swapped() if swapped else pair
            if analyses is None:
                messages, written = render_request(adapter, Prefer, shown.inputs(), budget)[2], VERDICT_PREFIX
            else:
                written = before_verdict(analyses.get((pair.id, swapped)))
                if written is None:
                    continue
                messages = render_request(adapter, Analyze, shown.inputs(), budget)[2]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + written
            label = None if shown.label not in ("A", "B") else float(shown.label == "A")
            rows.append(
                VerdictRow(pair.id, swapped, tuple(tokenizer(text, add_special_tokens=False)["input_ids"]), label)
            )
    return rows


def shown_orders(pair: Pair, orders: str) -> tuple[bool, ...]:
    """``swapped`` for each presentation of ``pair`` that :func:`verdict_rows` makes a row of."""
    if orders == "both":
        return (False, True)
    return (int(hashlib.sha256(pair.id.encode()).hexdigest(), 16) % 2 == 1,)


def before_verdict(raw: str | None) -> str | None:
    """What a constrained ``Analyze`` output holds before its verdict letter (``'{"analysis":"...","preference":"'``),
    or None when it reached no whole verdict (cut off, or not one letter and the end of the object). The last key is
    the real one: one inside the analysis is escaped."""
    if not raw or VERDICT_KEY not in raw:
        return None
    cut = raw.rindex(VERDICT_KEY) + len(VERDICT_KEY)
    return raw[:cut] if re.fullmatch(r'[AB]"\s*}\s*', raw[cut:]) else None


class FeatureStore:
    """Hidden states by row key, in ``.npz`` shards under one folder (committed with a bench: a new machine resumes)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._features: dict[str, np.ndarray] = {}
        for shard in sorted(set(self.folder.glob("shard-*.npz")) - set(self.folder.glob("shard-*.partial.npz"))):
            with np.load(shard) as data:
                self._features.update(zip(data["keys"].tolist(), data["features"]))

    def __contains__(self, key: str) -> bool:
        return key in self._features

    def __len__(self) -> int:
        return len(self._features)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        return np.stack([self._features[k] for k in keys]).astype(np.float32)

    def add(self, keys: list[str], features: np.ndarray) -> None:
        """One shard, written whole under a temporary name and renamed, so a reader never sees half of one; named by
        its contents, so two extractions into one folder cannot overwrite each other's shards."""
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        partial = self.folder / f"shard-{name}.partial.npz"
        np.savez(partial, keys=np.asarray(keys), features=features.astype(np.float16))
        partial.rename(self.folder / f"shard-{name}.npz")
        self._features.update(zip(keys, features.astype(np.float16)))


def extract(
    model_dir: str | Path,
    rows: Sequence[VerdictRow],
    store: FeatureStore,
    *,
    dtype: str = "bfloat16",
    threads: int = 0,
    progress: bool = True,
) -> None:
    """The final hidden state at the verdict slot of every row not yet in ``store``, one row a forward pass
    (no padding to pay for), saved every :data:`SHARD` rows."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    todo = list({row.key: row for row in rows if row.key not in store}.values())
    if not todo:
        return
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    logger.info(
        "extracting %d of %d rows' features with %s (%d already stored)", len(todo), len(rows), model_dir, len(store)
    )
    keys, batch = [], []
    with torch.inference_mode():
        for row in tqdm(todo, desc="verdict features", unit="row", disable=not progress):
            hidden = model.model(input_ids=torch.tensor([row.token_ids])).last_hidden_state[0, -1]
            keys.append(row.key)
            batch.append(hidden.float().numpy())
            if len(keys) == SHARD:
                store.add(keys, np.stack(batch))
                keys, batch = [], []
    if keys:
        store.add(keys, np.stack(batch))


def verdict_direction(model_dir: str | Path, tokenizer) -> np.ndarray:
    """``w_A - w_B``: the base model's own verdict, as a direction in its hidden space."""
    from safetensors import safe_open

    a, b = (tokenizer.convert_tokens_to_ids(letter) for letter in ("A", "B"))
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:  # bfloat16 folders: numpy has no such type
            if "lm_head.weight" in weights.keys():
                head = weights.get_slice("lm_head.weight")
                return (head[a : a + 1].float() - head[b : b + 1].float())[0].numpy()
    raise ValueError(
        f"{model_dir} has no separate lm_head.weight: a model whose head is tied to its embeddings "
        "cannot take a verdict head without changing its input embeddings"
    )


@dataclass(frozen=True)
class VerdictHead:
    delta: np.ndarray  # added to w_A - w_B
    l2: float
    train_rows: int
    train_loss: float

    def logit(self, features: np.ndarray, base: np.ndarray) -> np.ndarray:
        """``logit(A) - logit(B)`` with the head: the base's difference plus ``delta . h``."""
        return features @ base + features @ self.delta


def fit_head(features: np.ndarray, base: np.ndarray, labels: np.ndarray, l2: float, steps: int = 200) -> VerdictHead:
    """A logistic regression on the hidden states with the base's own logit difference as a fixed offset, and an L2
    pull of ``delta`` toward zero (no change): mean log loss + ``l2 * |delta|^2``. No intercept: a constant would be
    a position bias, which the order-averaged program cancels anyway."""
    import torch

    x = torch.tensor(features, dtype=torch.float64)
    offset = x @ torch.tensor(base, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    delta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([delta], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(offset + x @ delta, y) + l2 * delta.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        final = float(torch.nn.functional.binary_cross_entropy_with_logits(offset + x @ delta, y))
    return VerdictHead(delta=delta.detach().numpy().astype(np.float32), l2=l2, train_rows=len(labels), train_loss=final)


def write_head(model_dir: str | Path, head: VerdictHead, out: str | Path, source: dict) -> Path:
    """The base folder with the head folded into its ``A`` and ``B`` rows of the LM head, landed atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reflectagent.models import landing

    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with landing(out, f"verdict head on {model_dir}", source) as partial:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if model.config.tie_word_embeddings:
            raise ValueError(
                f"{model_dir} ties its LM head to its input embeddings: a verdict head would change them too"
            )
        weight = model.lm_head.weight.data
        a, b = (tokenizer.convert_tokens_to_ids(letter) for letter in ("A", "B"))
        delta = torch.tensor(head.delta, dtype=weight.dtype)
        weight[a] += delta / 2
        weight[b] -= delta / 2
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return out
