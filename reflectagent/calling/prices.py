"""DSPy's price table, looked up for every response, made cheap for models it does not list (every self-hosted
vLLM model): a patch of DSPy's lookup, installed once, when a backend is first resolved."""

from __future__ import annotations

import functools


@functools.cache
def remember_unpriced_models() -> None:
    """DSPy prices every response from its model table. For a model the table does not list (every
    self-hosted vLLM model) each lookup scans the whole table: 0.38 ms here, twice a call, about a
    third of this library's own CPU per LM call (``bench/library_overhead.py``). The answer for a
    model cannot change while the bundled table does not, so the miss is remembered; a model the
    table lists is looked up as before. Installed once, when a backend is first resolved."""
    import copy

    from dspy.clients import capabilities, costs, model_metadata

    lookup = model_metadata.model_info
    missing: set = set()

    def model_info(provider, model, *, namespaces=None):
        key = (provider, model, None if namespaces is None else tuple(namespaces))
        if key in missing:
            return {}
        found = lookup(provider, model, namespaces=namespaces)
        if not found:
            missing.add(key)
        return copy.deepcopy(found) if found else found

    costs.model_info = capabilities.model_info = model_info
