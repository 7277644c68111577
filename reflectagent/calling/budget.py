"""A request's inputs fitted to the backend's context: cut to a character budget, then, where the model's tokens can be
counted, to the tokens its context leaves after the completion. Inference and training data render through
:func:`render_request`, so a fine-tuned model is trained on exactly the text it is served."""

from __future__ import annotations

from reflectagent.errors import ReflectAgentError
from reflectagent.serving.tokens import InputBudget, RouteMissing


def fit_to_budget(texts: dict[str, str], budget: int | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """Cut the longest texts until all fit in ``budget`` characters; name what was cut.

    Short texts keep everything; the budget left is shared evenly among the long ones, each
    keeping its head and tail around a visible marker, so a judge sees that text is missing.
    """
    if budget is None or sum(map(len, texts.values())) <= budget:
        return dict(texts), ()
    remaining, share = budget, {}
    pending = sorted(texts, key=lambda k: len(texts[k]))
    while pending:
        even = remaining // len(pending)
        name = pending.pop(0)
        share[name] = min(len(texts[name]), even)
        remaining -= share[name]
    fitted, cut = {}, []
    for name, text in texts.items():
        keep = share[name]
        if keep >= len(text):
            fitted[name] = text
            continue
        cut.append(name)
        marker = f"\n[... {len(text) - keep} characters cut to fit the judge's context ...]\n"
        head = max(keep - len(marker), 0) * 2 // 3
        tail = max(keep - len(marker) - head, 0)
        fitted[name] = text[:head] + marker + (text[-tail:] if tail else "")
    return fitted, tuple(cut)


class InputTooLong(ReflectAgentError, ValueError):
    """Even with every input cut to nothing, the request would not fit the model's context."""


def render_request(adapter, signature, inputs: dict[str, str], budget: InputBudget | int | None, demos=()):
    """The inputs cut to the backend's budget (demos share it), the fields that were cut, and the
    chat messages sent. Inference and training data render through this one function, so a
    fine-tuned model is trained on exactly the text it is served.

    A character budget (``budget.chars``, or an int) cuts first. A token budget then measures the
    whole rendered prompt with the model's own count and, if it is too long, searches the largest
    character budget whose prompt fits (an estimate from the text's tokens per character, then
    bisection), so no request is refused for length and little room is left unused.
    ``InputTooLong`` when even inputs cut to their markers do not fit (demos or instructions too long).
    A count that cannot be had (:class:`~reflectagent.serving.tokens.RouteMissing`: a server without ``/tokenize``,
    which the backend's counter has said once, ``Backend.cannot_count``) leaves the request as the character
    budget renders it.
    """
    budget = budget if isinstance(budget, InputBudget) else InputBudget(chars=budget)
    chars = budget.chars
    if chars is not None and demos:
        chars = max(chars - sum(len(str(v)) for demo in demos for v in dict(demo).values()), chars // 4)
    fitted, truncated = fit_to_budget(inputs, chars)
    messages = adapter.format(signature, list(demos), fitted)
    if not budget.counts_tokens:
        return fitted, truncated, messages
    try:
        return _fit_to_tokens(adapter, signature, inputs, budget, demos, fitted, truncated, messages)
    except RouteMissing:
        return fitted, truncated, messages


def _fit_to_tokens(adapter, signature, inputs, budget: InputBudget, demos, fitted, truncated, messages):
    """:func:`render_request`'s token budget: the request as the characters rendered it if it fits, else the largest
    character budget whose prompt does."""
    used = budget.count(messages)
    if used <= budget.tokens:
        return fitted, truncated, messages

    def render(limit: int):
        cut, names = fit_to_budget(inputs, limit)
        shown = adapter.format(signature, list(demos), cut)
        return cut, names, shown, budget.count(shown)

    length = sum(map(len, fitted.values()))
    overhead = budget.count(adapter.format(signature, list(demos), dict.fromkeys(fitted, "")))
    best, low, high = None, 0, length  # character budgets: ``low`` fits (or is 0), ``high`` does not
    guess = int((budget.tokens - overhead) * length / max(used - overhead, 1) * 0.97)
    for _ in range(10):
        if guess <= low or guess >= high:
            guess = (low + high) // 2
        attempt = render(guess)
        if attempt[3] <= budget.tokens:
            best, low = attempt, guess
        else:
            high = guess
        if best is not None and high - low <= max(high // 50, 16):  # within 2%: good enough, and deterministic
            break
        guess = (low + high) // 2
    if best is None:
        attempt = render(0)
        if attempt[3] > budget.tokens:
            raise InputTooLong(
                f"the prompt needs {attempt[3]} tokens with every input cut, more than the "
                f"{budget.tokens} the model's context leaves after the completion: shorten the demos "
                "or instructions, lower max_tokens, or serve the model with a longer context"
            )
        best = attempt
    return best[0], best[1], best[2]
