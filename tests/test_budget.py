"""Inputs fit the model's context in tokens, counted by the model's own tokenizer."""

import pytest

from reflectagent.adapter import JudgeAdapter
from reflectagent.pairs import Pair
from reflectagent.signatures import Analyze
from reflectagent.steps import InputTooLong, render_request
from reflectagent.tokens import InputBudget, folder_counter

PAIR = Pair(
    prompt="Review this code.\n" + "x = [i * 31 % 7 for i in range(10)]\n" * 400,
    response_a="It builds a list.",
    response_b="It is a loop.",
)


def test_a_token_budget_cuts_what_a_character_budget_lets_through(model_dir):
    count = folder_counter(model_dir)
    adapter = JudgeAdapter(constrained=True)
    loose = InputBudget(chars=16000)  # the characters fit, the tokens would not
    _, cut, messages = render_request(adapter, Analyze, PAIR.inputs(), loose)
    assert cut == () and count(messages) > 2000
    budget = InputBudget(chars=16000, tokens=1500, count=count)
    fitted, cut, messages = render_request(adapter, Analyze, PAIR.inputs(), budget)
    assert cut == ("prompt",) and 1200 < count(messages) <= 1500  # fits, and not cut far below the room
    assert "characters cut to fit" in fitted["prompt"] and fitted["response_a"] == PAIR.response_a
    assert render_request(adapter, Analyze, PAIR.inputs(), budget)[2] == messages  # deterministic: one cache key


def test_a_prompt_that_cannot_fit_says_what_to_change():
    words = lambda messages: sum(len(m["content"].split()) for m in messages)  # noqa: E731 - a stand-in tokenizer
    with pytest.raises(InputTooLong, match="lower max_tokens, or serve the model with a longer context"):
        render_request(JudgeAdapter(), Analyze, PAIR.inputs(), InputBudget(tokens=20, count=words))
    short = Pair(prompt="2+2?", response_a="4", response_b="5").inputs()
    assert render_request(JudgeAdapter(), Analyze, short, InputBudget(tokens=10_000, count=words))[1] == ()
