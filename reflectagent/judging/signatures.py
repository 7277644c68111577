"""The three judgments a generative reward model makes, as DSPy signatures.

``Analyze`` is GenRM's rationale-then-verdict step and ReflectRM's stage 1; ``Reflect`` is
ReflectRM's stage 2 (which of two analyses of the same pair is more reliable); ``Verdict``
lets a program separate the reasoning from the final call; ``Prefer`` is the verdict alone, for
scoring by the verdict token's probability where a small model's rationale adds more noise than
signal (GenRM's direct baseline); ``Rate`` scores one response on its own (pointwise: no order to
be biased by, and a score per response for group rewards), ``Assess`` after a written assessment. Field names and order are part
of the contract: the JSON rendering of these fields is what fine-tuning trains on.
"""

from typing import Literal

import dspy

_JUDGE_PRINCIPLES = (
    "A careful judge checks, in this order: does the response follow the user's instruction; "
    "is it correct; is it helpful; is it harmless. Length, the order in which the responses are "
    "shown, and style or formatting are not merits in themselves: a longer, first-shown or "
    "prettier response is not better for that reason."
)


class Analyze(dspy.Signature):
    __doc__ = (
        "Compare two responses to the same prompt and decide which one is better.\n\n"
        + _JUDGE_PRINCIPLES
        + " Write a short analysis of the decisive differences first, then give the preference."
    )

    prompt: str = dspy.InputField(desc="the user's request, or the conversation so far")
    response_a: str = dspy.InputField(desc="the first candidate response")
    response_b: str = dspy.InputField(desc="the second candidate response")
    analysis: str = dspy.OutputField(desc="a brief comparison of the decisive differences")
    preference: Literal["A", "B"] = dspy.OutputField(desc="A if response_a is better, B if response_b is better")


class Reflect(dspy.Signature):
    __doc__ = (
        "Two analyses compare the same pair of responses. Decide which analysis is more reliable.\n\n"
        "A reliable analysis gets the facts of both responses right, applies the judging criteria "
        "faithfully and reaches a verdict that follows from its own reasoning. "
        + _JUDGE_PRINCIPLES
        + " Check both analyses against the responses themselves, then name the more reliable one."
    )

    prompt: str = dspy.InputField(desc="the user's request, or the conversation so far")
    response_a: str = dspy.InputField(desc="the first candidate response")
    response_b: str = dspy.InputField(desc="the second candidate response")
    analysis_1: str = dspy.InputField(desc="the first analysis, with its verdict")
    analysis_2: str = dspy.InputField(desc="the second analysis, with its verdict")
    reflection: str = dspy.OutputField(desc="where each analysis is right or wrong about the responses")
    more_reliable: Literal["1", "2"] = dspy.OutputField(desc="1 or 2: the analysis to trust")


class Verdict(dspy.Signature):
    __doc__ = (
        "Given an analysis of two responses to the same prompt, give the final preference.\n\n" + _JUDGE_PRINCIPLES
    )

    prompt: str = dspy.InputField(desc="the user's request, or the conversation so far")
    response_a: str = dspy.InputField(desc="the first candidate response")
    response_b: str = dspy.InputField(desc="the second candidate response")
    analysis: str = dspy.InputField(desc="an analysis of the two responses")
    preference: Literal["A", "B"] = dspy.OutputField(desc="A if response_a is better, B if response_b is better")


class Prefer(dspy.Signature):
    __doc__ = "Compare two responses to the same prompt and decide which one is better.\n\n" + _JUDGE_PRINCIPLES

    prompt: str = dspy.InputField(desc="the user's request, or the conversation so far")
    response_a: str = dspy.InputField(desc="the first candidate response")
    response_b: str = dspy.InputField(desc="the second candidate response")
    preference: Literal["A", "B"] = dspy.OutputField(desc="A if response_a is better, B if response_b is better")


_POINTWISE_PRINCIPLES = (
    "A careful judge checks, in this order: does the response follow the user's instruction; is it correct; "
    "is it helpful; is it harmless. Length and style or formatting are not merits in themselves: a longer or "
    "prettier response is not better for that reason."
)


class Rate(dspy.Signature):
    __doc__ = "Rate one response to a prompt on its own, from 1 (poor) to 5 (excellent).\n\n" + _POINTWISE_PRINCIPLES

    prompt: str = dspy.InputField(desc="the user's request, or the conversation so far")
    response: str = dspy.InputField(desc="the candidate response")
    rating: Literal["1", "2", "3", "4", "5"] = dspy.OutputField(
        desc="1 poor, 2 weak, 3 acceptable, 4 good, 5 excellent"
    )


class Assess(dspy.Signature):
    __doc__ = (
        "Assess one response to a prompt on its own, then rate it from 1 (poor) to 5 (excellent).\n\n"
        + _POINTWISE_PRINCIPLES
        + " Write a short assessment of the response's decisive strengths and flaws first, then the rating."
    )

    prompt: str = dspy.InputField(desc="the user's request, or the conversation so far")
    response: str = dspy.InputField(desc="the candidate response")
    assessment: str = dspy.OutputField(desc="a brief assessment of the decisive strengths and flaws")
    rating: Literal["1", "2", "3", "4", "5"] = dspy.OutputField(
        desc="1 poor, 2 weak, 3 acceptable, 4 good, 5 excellent"
    )
