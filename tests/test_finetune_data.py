"""Unified training data from hand-made traces: STaR filter, rationalisation, reflection pairs,
the 4:1 mix, no pair leakage, and prompt identity with what inference sends."""

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from fakes import BAD, GOOD, PAIR

from reflectagent.adapter import JudgeAdapter
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.finetune.data import DataConfig, Trace, build_unified_data, response_rows
from reflectagent.modules import Analyzer, Reflector
from reflectagent.pairs import Pair
from reflectagent.results import Analysis, Judgment, Reflection
from reflectagent.tokens import InputBudget


def analysis(preference, swapped, text, sample=0, parsed=True):
    return Analysis(
        text=text, preference=preference if parsed else None, swapped=swapped, parsed=parsed, raw="", sample=sample
    )


def trace(i, label="A", analyses=None, reflections=()):
    pair = Pair(
        prompt=f"question {i}",
        response_a=f"answer a{i}",
        response_b=f"answer b{i}",
        id=f"p{i}",
        label=label,
        source="s1" if i % 2 else "s2",
    )
    analyses = analyses or (
        analysis(label, False, f"right answer, long enough {i}"),
        analysis(label, True, f"right swapped answer, long enough {i}"),
    )
    return Trace(pair, Judgment(preference=label, analyses=tuple(analyses), reflections=tuple(reflections)))


class FakeRationalizer:
    def __init__(self):
        self.asked = []

    def analyse(self, pair, swapped):
        self.asked.append((pair.id, swapped))
        return Analysis(
            text=f"because {pair.label} answers the question",
            preference=pair.label,
            swapped=swapped,
            parsed=True,
            raw="",
        )

    def reflect(self, pair, first, second, choice):
        return f"analysis {choice} checks the facts against the responses"


def test_star_filter_keeps_only_correct_analyses_and_marks_rationalised_rows():
    mixed = trace(
        1,
        "A",
        [
            analysis("A", False, "right: Paris is the capital"),
            analysis("B", False, "wrong", sample=1),
            analysis("A", False, "{analysis}", sample=2),  # the format's placeholder copied back
            analysis("A", False, "It is good. " + "I'm not sure what I'm saying. " * 12, sample=3),  # a loop
            analysis("B", True, "fooled by order"),
            analysis(None, True, "", parsed=False),
        ],
    )
    rationalizer = FakeRationalizer()
    rows = response_rows(mixed, JudgeAdapter(), DataConfig(), rationalizer)
    assert [(r["order"], r["rationalized"]) for r in rows] == [("AB", False), ("BA", True)]
    assert '"analysis":"right: Paris is the capital"' in rows[0]["completion"][0]["content"]  # not "{analysis}"
    assert rows[0]["completion"][0]["content"].endswith('"preference":"A"}')
    assert rows[1]["completion"][0]["content"].endswith('"preference":"B"}')  # label A, shown swapped: B
    assert rationalizer.asked == [("p1", True)]
    assert len(response_rows(mixed, JudgeAdapter(), DataConfig(rationalize=False), rationalizer)) == 1


def test_reflection_pairs_mix_split_and_dpo():
    traces = []
    for i in range(40):
        if i % 4 == 0:  # one right and one wrong analysis in the same order: reflection and DPO material
            analyses = [
                analysis("A", False, f"right, and long enough {i}"),
                analysis("B", False, f"wrong, and long enough {i}", sample=1),
                analysis("A", True, f"right swapped, long enough {i}"),
            ]
            reflections = [
                Reflection(
                    text=f"trust the first, it checks facts {i}",
                    first=0,
                    second=1,
                    more_reliable=0,
                    parsed=True,
                    raw="",
                )
            ]
            traces.append(trace(i, "A", analyses, reflections))
        else:
            traces.append(trace(i, "A"))
    data = build_unified_data(traces, DataConfig(ratio=4.0, seed=1), FakeRationalizer())
    ids = {name: {r["pair_id"] for r in rows} for name, rows in data.splits.items()}
    assert not (ids["train"] & ids["dev"]) and not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"])
    for name, pairs in data.pair_splits.items():
        assert ids[name] <= {p.id for p in pairs}
    kinds = data.stats["rows"]["train"]
    assert kinds["response"] == 4 * kinds["analysis"]
    reflection_rows = [r for rows in data.splits.values() for r in rows if r["kind"] == "analysis"]
    slots = set()
    for row in reflection_rows:
        target = row["completion"][0]["content"]
        user = row["prompt"][-1]["content"]
        right_slot = "1" if "[[ ## analysis_1 ## ]]\nright" in user else "2"
        assert target.endswith(f'"more_reliable":"{right_slot}"}}')
        slots.add(right_slot)
    assert slots == {"1", "2"}  # the right analysis appears in both positions
    assert sum(len(v) for v in data.dpo.values()) == 10
    unified, dpo = data.to_datasets()
    assert set(unified["train"].column_names) >= {"prompt", "completion", "kind", "rationalized", "pair_id"}
    assert dpo["train"][0]["chosen"][0]["content"].endswith('"preference":"A"}')


def test_training_prompts_are_exactly_what_inference_sends():
    """Render rows with the data builder, then capture the messages the programs really send."""
    from reflectagent.finetune.data import render_prompt
    from reflectagent.signatures import Analyze

    lm = DummyLM(
        {"[[ ## analysis_1 ## ]]": {"reflection": "r", "more_reliable": "1"}, "": {"analysis": "x", "preference": "A"}},
        adapter=JudgeAdapter(),
    )
    pair = Pair(prompt=PAIR.prompt + " " + "long context " * 400, response_a=GOOD, response_b=BAD, id="p", label="A")
    analyses = (
        analysis("A", False, "right: Paris is the capital"),
        analysis("B", True, "wrong: Berlin is the capital"),
    )
    teacher = tuple(
        Reflection(
            text="trust the right one, it knows the capital", first=f, second=s, more_reliable=0, parsed=True, raw=""
        )
        for f, s in ((0, 1), (1, 0))
    )
    judged = Trace(pair, Judgment(preference="A", analyses=analyses, reflections=teacher))
    config = DataConfig(context_chars=1500, ratio=None, fractions="1,0,0")

    class Backend:  # the serving backend's input budget, as run_step reads it
        context_chars, logprobs, seed = 1500, False, None
        identity = {"model": "dummy"}

        @staticmethod
        def adapter():
            return JudgeAdapter()

        @staticmethod
        def input_budget():
            return InputBudget(chars=1500)

    lm.backend = Backend()
    with use_cache(JudgmentCache(enabled=False)), dspy.context(lm=lm):
        Analyzer()(pair, swapped=False)
        sent_analyze = lm.history[-1]["messages"]
        reflector = Reflector()
        reflector(pair, analyses, first=0, second=1)
        sent_reflect = {(0, 1): lm.history[-1]["messages"]}
        reflector(pair, analyses, first=1, second=0)
        sent_reflect[(1, 0)] = lm.history[-1]["messages"]
    rows = build_unified_data([judged], config).splits["train"]
    [response] = [r for r in rows if r["kind"] == "response"]  # only the right, unswapped analysis
    assert response["order"] == "AB" and response["prompt"] == sent_analyze
    assert "characters cut to fit" in sent_analyze[-1]["content"]  # the same cut as inference
    [reflect] = [r for r in rows if r["kind"] == "analysis"]
    first, second = map(int, reflect["order"].split("-"))
    assert reflect["prompt"] == sent_reflect[(first, second)]
    assert render_prompt(JudgeAdapter(), Analyze, pair.inputs(), 1500) == sent_analyze


def test_rows_are_cut_to_the_teacher_backends_budget_unless_told_otherwise():
    from types import SimpleNamespace

    from reflectagent.finetune.traces import for_backend

    teacher = SimpleNamespace(context_chars=1234)
    assert for_backend(None, teacher).context_chars == 1234  # the default promises the teacher's budget
    assert for_backend(DataConfig(context_chars=900), teacher).context_chars == 900
    assert for_backend(DataConfig(ratio=2.0), teacher).ratio == 2.0


def test_a_teacher_file_teaches_both_orders_and_is_contrasted_with_the_students_mistakes():
    from reflectagent.finetune.traces import teacher_traces
    from reflectagent.teacher import TeacherJudgment

    judgments = [
        TeacherJudgment(
            pair=Pair(prompt=f"q{i}", response_a=f"a{i}", response_b=f"b{i}", id=f"t{i}", label="A"),
            analysis=f"Response A answers q{i} correctly; Response B does not.",
            preference="A",
        )
        for i in range(10)
    ]
    student = [
        Trace(
            j.pair,
            Judgment(
                preference=None,
                analyses=(
                    analysis("B", False, f"the second one looks better to me {i}"),
                    analysis("A", True, f"right for once, pair {i}"),
                ),
            ),
        )
        if i % 2 == 0
        else None
        for i, j in enumerate(judgments)
    ]
    traces = teacher_traces(judgments, student)
    with pytest.raises(ValueError, match="by position"):
        teacher_traces(judgments, student[:3])
    assert [len(t.judgment.analyses) for t in traces] == [4, 2] * 5
    shown = traces[0].judgment.analyses[1]
    assert shown.swapped and shown.text == "Response B answers q0 correctly; Response A does not."
    data = build_unified_data(traces, DataConfig(ratio=None, fractions="1,0,0"), FakeRationalizer())
    rows = data.splits["train"]
    teacher_rows = [
        r for r in rows if r["kind"] == "response" and "Response A answers" in r["completion"][0]["content"]
    ]
    assert len(teacher_rows) == 10 and not any(r["rationalized"] for r in teacher_rows)  # the teacher needs no help
    swapped = [
        r
        for r in rows
        if r["kind"] == "response" and r["order"] == "BA" and "Response B answers" in r["completion"][0]["content"]
    ]
    assert len(swapped) == 10 and all(r["completion"][0]["content"].endswith('"preference":"B"}') for r in swapped)
    reflect = [r for r in rows if r["kind"] == "analysis"]
    assert {r["pair_id"] for r in reflect} == {f"t{i}" for i in range(0, 10, 2)}  # only where the student erred
    assert sum(len(v) for v in data.dpo.values()) == 5  # teacher (chosen) over the student's wrong analysis, same order


def test_teacher_reflections_carry_the_teachers_reasons_and_name_the_analysis_that_agrees_with_it():
    import json

    from reflectagent.finetune.traces import teacher_traces, with_teacher_reflections
    from reflectagent.teacher import TeacherJudgment

    judgment = TeacherJudgment(
        pair=Pair(prompt="Is 7 prime?", response_a="No.", response_b="Yes, 7 is prime.", id="t0", label="B"),
        analysis="Response B is right: 7 has no divisor but 1 and itself. Response A is wrong.",
        preference="B",
    )
    wrong = analysis("A", False, "the shorter answer is clearer, so I prefer it")
    right = analysis("B", True, "the answer shown first is correct about 7")  # preferences are in the pair's order
    [made] = teacher_traces([judgment], [Trace(judgment.pair, Judgment(preference=None, analyses=(wrong, right)))])
    reflected = with_teacher_reflections(made).judgment
    analyses = reflected.analyses  # teacher as shown, teacher swapped, the student's wrong one, its right one
    assert [a.preference == "B" for a in analyses] == [True, True, False, True]
    assert {(r.first, r.second) for r in reflected.reflections} == {
        pair for good in (0, 1, 3) for pair in ((good, 2), (2, good))
    }
    for r in reflected.reflections:
        assert r.more_reliable != 2 and "7 has no divisor but 1 and itself" in r.text
        good = "1" if r.first == r.more_reliable else "2"
        assert r.text.startswith(
            f"Analysis {good} prefers Response B, analysis {'2' if good == '1' else '1'} Response A"
        )
        assert r.text.endswith(f"So analysis {good} is the more reliable.")
    data = build_unified_data([with_teacher_reflections(made)], DataConfig(ratio=None, fractions="1,0,0"))
    reflect = [json.loads(r["completion"][0]["content"]) for r in data.splits["train"] if r["kind"] == "analysis"]
    assert len(reflect) == 3 and not any(r["rationalized"] for r in data.splits["train"])  # no student wrote one
    assert all("7 has no divisor" in r["reflection"] and r["more_reliable"] in ("1", "2") for r in reflect)
    student_only = Trace(judgment.pair, Judgment(preference=None, analyses=(wrong, right)))
    with pytest.raises(ValueError, match="no teacher analysis"):
        with_teacher_reflections(student_only)


def test_verdict_rows_are_what_direct_prob_sends_in_both_orders_labels_flipped_with_the_order():
    from reflectagent.finetune.data import build_verdict_data
    from reflectagent.programs import named_program

    pairs = [
        Pair(prompt=f"q{i % 10}", response_a=f"a{i}", response_b=f"b{i}", id=f"p{i}", label="AB"[i % 2], source="s")
        for i in range(20)
    ]  # ten prompts, two pairs each
    pairs += [
        Pair(prompt="q-tie", response_a="x", response_b="y", id="tie", label="tie"),
        Pair(prompt="q", response_a="x", response_b="z", id="none"),
    ]
    data = build_verdict_data(pairs, DataConfig(fractions="0.8,0.2,0"))
    rows = [r for split in data.splits.values() for r in split]
    assert len(rows) == 40 and {r["kind"] for r in rows} == {"verdict"}
    assert data.stats["pairs_left_out_unlabelled_or_tied"] == 2 and data.stats["label_counts"] == {"A": 10, "B": 10}
    splits_of = {}
    for name, split in data.splits.items():
        for r in split:
            splits_of.setdefault(r["pair_id"], set()).add(name)
    assert all(len(names) == 1 for names in splits_of.values())  # no pair in two splits
    prompt_splits = {}
    for name, chosen in data.pair_splits.items():
        for pair in chosen:
            prompt_splits.setdefault(pair.prompt, set()).add(name)
    assert all(len(names) == 1 for names in prompt_splits.values())  # a prompt's pairs stay together: nothing dropped
    assert len(data.pair_splits["dev"]) > 0 and data.stats["prompts"]["dev"] * 2 == len(data.pair_splits["dev"])
    by_key = {(r["pair_id"], r["order"]): r for r in rows}
    # p1 is labelled B: shown as given its target is B; swapped, the same response is shown first, so A
    assert by_key[("p1", "AB")]["completion"][0]["content"] == '{"preference":"B"}'
    assert by_key[("p1", "BA")]["completion"][0]["content"] == '{"preference":"A"}'

    lm = DummyLM([{"preference": "A"}, {"preference": "B"}], adapter=JudgeAdapter())
    with use_cache(JudgmentCache(enabled=False)), dspy.context(lm=lm):
        named_program("direct-prob").judge(pairs[1])
    sent = [entry["messages"] for entry in lm.history[-2:]]
    assert sorted(map(repr, sent)) == sorted(repr(by_key[("p1", order)]["prompt"]) for order in ("AB", "BA"))


def test_finetune_data_kind_verdict_takes_the_train_split_and_makes_no_lm_call(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from reflectagent import embedded
    from reflectagent.cli import app
    from reflectagent.eval import load_benchmark
    from reflectagent.splits import split_pairs

    source = tmp_path / "pairs.jsonl"
    rows = [
        {
            "id": f"p{i}",
            "prompt": f"question {i % 20}",
            "response_a": f"first {i}",
            "response_b": f"second {i}",
            "label": "AB"[i % 3 % 2],
            "source": "s",
        }
        for i in range(30)
    ]  # ten prompts with two pairs each
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def no_server(*args, **kwargs):
        raise AssertionError("building verdict rows asked for a server")

    monkeypatch.setattr(embedded, "embedded_url", no_server)
    monkeypatch.delenv("REFLECTAGENT_EMBEDDED_URL", raising=False)
    out = tmp_path / "data"
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "data",
            "--kind",
            "verdict",
            "--data",
            str(source),
            "--split",
            "train",
            "--out",
            str(out),
            "--fractions",
            "1,0,0",
        ],
    )
    assert result.exit_code == 0, result.output
    card = json.loads((out / "data_card.json").read_text())
    assert card["labels"] == "the data files' own labels" and card["split"] == "train"
    import datasets

    trained = {r["pair_id"] for r in datasets.load_from_disk(str(out / "unified"))["train"]}
    split = split_pairs(load_benchmark(source)[0], seed=0)
    held_out = {p.prompt for p in split["dev"] + split["test"]}
    expected = {
        p.id for p in split["train"] if p.prompt not in held_out
    }  # a test prompt's other pair is not trained on
    left_out = card["train_pairs_left_out_for_sharing_a_dev_or_test_prompt"]
    assert trained == expected and 0 < len(trained) and left_out > 0 and len(trained) + left_out == len(split["train"])

    for flags, message in (
        (["--kind", "bogus"], "--kind is"),
        (["--split", "later"], "--split is one of"),
        (["--teacher-file", str(source), "--split", "train"], "a teacher file is used whole"),
    ):
        data_flag = [] if "--teacher-file" in flags else ["--data", str(source)]
        refused = CliRunner().invoke(app, ["finetune", "data", *data_flag, *flags, "--out", str(tmp_path / "x")])
        assert refused.exit_code == 2 and message in refused.output, refused.output


def test_finetune_data_kind_verdict_from_a_teacher_file_and_refusing_an_empty_result(tmp_path, monkeypatch):
    import json

    import datasets
    from typer.testing import CliRunner

    from reflectagent.cli import app

    monkeypatch.delenv("REFLECTAGENT_EMBEDDED_URL", raising=False)
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text(
        "\n".join(
            json.dumps(
                {
                    "id": f"t{i}",
                    "prompt": f"q{i}",
                    "response_a": f"a{i}",
                    "response_b": f"b{i}",
                    "teacher_analysis": "Response A is right.",
                    "teacher_preference": "AB"[i % 2],
                    "teacher": "gpt",
                }
            )
            for i in range(12)
        )
        + "\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "data",
            "--kind",
            "verdict",
            "--teacher-file",
            str(teacher),
            "--fractions",
            "1,0,0",
            "--out",
            str(tmp_path / "t"),
        ],
    )
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "t" / "data_card.json").read_text())
    assert (
        card["teachers"] == ["gpt"]
        and "teacher's preference" in card["labels"]
        and card["label_counts"] == {"A": 6, "B": 6}
    )
    assert len(datasets.load_from_disk(str(tmp_path / "t" / "unified"))["train"]) == 24

    ties = tmp_path / "ties.jsonl"
    ties.write_text(
        "\n".join(
            json.dumps({"id": f"p{i}", "prompt": f"q{i}", "response_a": "x", "response_b": "y", "label": "tie"})
            for i in range(4)
        )
        + "\n"
    )
    refused = CliRunner().invoke(
        app, ["finetune", "data", "--kind", "verdict", "--data", str(ties), "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code == 1 and "no training rows" in refused.output, refused.output


def test_finetune_data_kind_rationale_teaches_the_teacher_files_analyses_in_both_orders_without_an_lm_call(
    tmp_path, monkeypatch
):
    """GenRM's rationale-then-verdict rows from a teacher file alone: its analysis is the rationale (names swapped
    with the order), its preference the verdict; a tie teaches nothing, and no server is asked for."""
    import json

    import datasets
    from typer.testing import CliRunner

    from reflectagent import embedded
    from reflectagent.cli import app

    def no_server(*args, **kwargs):
        raise AssertionError("building rationale rows asked for a server")

    monkeypatch.setattr(embedded, "embedded_url", no_server)
    monkeypatch.delenv("REFLECTAGENT_EMBEDDED_URL", raising=False)
    teacher = tmp_path / "teacher.jsonl"
    rows = [
        {
            "id": f"t{i}",
            "prompt": f"question {i}",
            "response_a": f"first {i}",
            "response_b": f"second {i}",
            "teacher_analysis": f"Response {'AB'[i % 2]} answers question {i}; Response {'BA'[i % 2]} does not.",
            "teacher_preference": "tie" if i == 0 else "AB"[i % 2],
            "teacher": "gpt",
        }
        for i in range(9)
    ]
    teacher.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "rationale"
    args = ["finetune", "data", "--kind", "rationale", "--teacher-file", str(teacher), "--fractions", "1,0,0"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "judge with --program genrm-prob" in result.output
    card = json.loads((out / "data_card.json").read_text())
    assert card["teachers"] == ["gpt"] and card["labels"] == "the teacher's preference"
    trained = list(datasets.load_from_disk(str(out / "unified"))["train"])
    assert len(trained) == 16 and {r["kind"] for r in trained} == {"response"}  # 8 pairs (not the tie), both orders
    for row in trained:
        i = int(row["pair_id"][1:])
        target = json.loads(row["completion"][0]["content"])
        better = "AB"[i % 2] if row["order"] == "AB" else "BA"[i % 2]  # the better response as shown
        assert target["preference"] == better
        assert target["analysis"].startswith(f"Response {better} answers question {i}")
        shown_first = f"first {i}" if row["order"] == "AB" else f"second {i}"
        text = row["prompt"][-1]["content"]
        assert text.index(shown_first) < text.index(f"second {i}" if row["order"] == "AB" else f"first {i}")

    refused = CliRunner().invoke(
        app, ["finetune", "data", "--kind", "rationale", "--data", str(teacher), "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "give --teacher-file" in refused.output, refused.output
    for flags in (["--data", str(teacher)], ["--teacher-file", str(teacher), "--kind", "rationale"]):
        refused = CliRunner().invoke(
            app, ["finetune", "data", *flags, "--reflections", "teacher", "--out", str(tmp_path / "x")]
        )
        assert refused.exit_code == 2 and "--reflections chooses who reflects" in refused.output, refused.output
    assert not (tmp_path / "x").exists()


def test_data_for_a_server_without_tokenize_is_cut_by_characters_with_one_warning(tmp_path, caplog, monkeypatch):
    """Training data is rendered with the student backend's input budget (``label_data``, ``distil``, ``mine``): for a
    served model with ``context_tokens`` set that budget counts tokens by ``/tokenize``, and a server without it
    (not vLLM, or a proxy: 404) raised RouteMissing out of data preparation, which only ``run_step`` caught. The
    backend's counter now falls back to the character budget itself, with one warning, for every caller."""
    import logging

    from fakes import ThreadEngine

    from reflectagent import backends
    from reflectagent.config import BackendConfig, Settings
    from reflectagent.finetune.traces import label_data

    monkeypatch.setattr(backends, "_warned", set(), raising=False)
    pairs = [
        Pair(prompt=f"question {i}", response_a=f"right {i}", response_b=f"wrong {i}", id=f"p{i}", label="AB"[i % 2])
        for i in range(6)
    ]
    pairs.append(Pair(prompt="why? " * 1500, response_a="right", response_b="wrong", id="long", label="A"))
    with ThreadEngine(routes="none") as engine, caplog.at_level(logging.WARNING, logger="reflectagent"):
        config = BackendConfig(
            model="hosted_vllm/fake", api_base=engine.api_base, context_tokens=2048, context_chars=4000
        )
        built = label_data(pairs, "student", Settings(backends={"student": config}), tmp_path / "data")
        asked = [(method, path) for method, path, _ in engine.seen]
    rows = [row for split in built.splits.values() for row in split]
    assert len({row["pair_id"] for row in rows}) == len(pairs) and not engine.chat_requests
    long = [row for row in rows if row["pair_id"] == "long"]
    assert long and all("characters cut to fit the judge's context" in row["prompt"][-1]["content"] for row in long)
    assert all(
        sum(len(m["content"]) for m in row["prompt"]) < 4000 + 3000 for row in long
    )  # context_chars, + the template
    assert asked == [("POST", "/tokenize")]  # asked once: the backend keeps to its characters from then on
    told = [r.getMessage() for r in caplog.records if "as vLLM serves it" in r.getMessage()]
    assert len(told) == 1 and "backend 'student': the server has no POST /tokenize" in told[0]
