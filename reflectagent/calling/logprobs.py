"""The verdict's probabilities, read from the tokens' log-probabilities a backend sends with its reply."""

from __future__ import annotations

import bisect
import math
import re
from typing import get_args


def choice_logprobs(logprobs: dict | None, signature) -> dict[str, dict[str, float]] | None:
    """For each Literal output field, the probability of each choice at its token.

    The tokens, not the returned text, are searched: a client may re-serialise the JSON.
    Probabilities are normalised over the field's choices (under constrained decoding they
    are the only tokens allowed there).
    """
    content = (logprobs or {}).get("content") if isinstance(logprobs, dict) else None
    if not content:
        return None
    fields = [(name, [str(c) for c in get_args(info.annotation)]) for name, info in signature.output_fields.items()]
    if not any(choices for _, choices in fields):
        return None
    # LiteLLM (a replica pool's Router) hands back pydantic objects where DSPy's own transport and the server's
    # JSON give dicts: only the tokens' text is read from each, and only the chosen token is read whole
    tokens = [(token if isinstance(token, dict) else _plain(token)).get("token") or "" for token in content]
    ends, end = [], 0
    for token in tokens:
        end += len(token)
        ends.append(end)
    text = "".join(tokens)
    result: dict[str, dict[str, float]] = {}
    for name, choices in fields:
        match = re.search(rf'"{re.escape(name)}"\s*:\s*"', text)
        if not choices or match is None:
            continue
        index = bisect.bisect_right(ends, match.end())  # the first token that ends past the opening quote
        if index >= len(tokens):
            continue
        chosen = _plain(content[index])
        probs = dict.fromkeys(choices, 0.0)
        alternatives = [_plain(alt) for alt in chosen.get("top_logprobs") or []]
        if chosen.get("token") not in {alt.get("token") for alt in alternatives}:
            # the token chosen is always a choice: an engine whose list is the model's before its grammar
            # (llama.cpp) can rank it below tokens the schema forbids, out of the list
            alternatives.append(chosen)
        for alt in alternatives:
            token = (alt.get("token") or "").strip().strip('"')
            if token in probs and alt.get("logprob") is not None and alt["logprob"] > -1e3:
                probs[token] += math.exp(alt["logprob"])
        total = sum(probs.values())
        if total > 0:
            result[name] = {c: p / total for c, p in probs.items()}
    return result or None


def _plain(entry) -> dict:
    return (
        entry if isinstance(entry, dict) else entry.model_dump() if hasattr(entry, "model_dump") else dict(vars(entry))
    )
