"""A file of strong-model judgments as a teacher: reading it, and demos drawn from it."""

import json
from pathlib import Path

import pytest

from reflectagent.programs import GenRM, ReflectRM
from reflectagent.programs.compile import teacher_demos, with_demos
from reflectagent.teacher import read_teacher, swap_names

SHARED_TEACHER = Path(__file__).resolve().parents[2] / "shared" / "data" / "teacher" / "alpaca_eval_gpt4_turbo.jsonl"


def row(i, preference, prompt="Name a prime.", analysis="Response A is right; Response B is not a prime."):
    return {
        "id": f"t{i}",
        "prompt": prompt,
        "response_a": f"{i}",
        "response_b": f"{i + 1}",
        "teacher_analysis": analysis,
        "teacher_preference": preference,
        "teacher": "gpt",
        "prompt_also_in": ["pandalm"],
    }


def test_a_teacher_file_is_read_with_its_preference_as_label_and_bad_lines_reported(tmp_path):
    path = tmp_path / "teacher.jsonl"
    rows = [
        row(1, "A"),
        row(2, "B", prompt="Held out?"),
        {"prompt": "p", "response_a": "a", "response_b": "b"},
        row(3, "maybe"),
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    judgments, bad = read_teacher(path, exclude_prompts=["Held out?"])
    assert [j.pair.id for j in judgments] == ["t1"] and judgments[0].pair.label == "A"  # the teacher's, said so
    assert judgments[0].prompt_also_in == ("pandalm",) and judgments[0].teacher == "gpt"
    assert [b.line for b in bad] == [3, 4, 5] and "teacher_analysis" in bad[0].error and "maybe" in bad[1].error
    shown = judgments[0].as_analysis(swapped=True)
    assert shown.text == "Response B is right; Response A is not a prime." and shown.preference == "A" and shown.swapped
    assert swap_names("Responses A-Z; Response A") == "Responses A-Z; Response B"


def test_teacher_demos_alternate_sides_stay_short_and_go_to_analysis_steps_only(tmp_path):
    path = tmp_path / "teacher.jsonl"
    path.write_text(
        "\n".join(json.dumps(row(i, "AB"[i % 3 == 0], prompt="p" * (10 if i < 20 else 5000))) for i in range(40))
    )
    judgments, _ = read_teacher(path)
    demos = teacher_demos(judgments, k=4, max_chars=200, seed=1)
    assert [d.preference for d in demos] == ["A", "B", "A", "B"]
    assert all(len(d.prompt) == 10 for d in demos) and teacher_demos(judgments, k=4, max_chars=200, seed=1) == demos
    with pytest.raises(ValueError, match="within 200 characters"):
        teacher_demos(judgments, k=40, max_chars=200)
    program = ReflectRM()
    compiled = with_demos(program, demos)
    assert compiled.analyzer.predict.demos == demos and compiled.reflector.predict.demos == []
    assert program.analyzer.predict.demos == []  # the original is untouched
    assert len(with_demos(GenRM(), demos[:2]).analyzer.predict.demos) == 2


@pytest.mark.skipif(not SHARED_TEACHER.exists(), reason="../shared/data/teacher is not beside the checkout")
def test_the_shared_teacher_file_reads_whole():
    judgments, bad = read_teacher(SHARED_TEACHER)
    assert len(judgments) == 7794 and not bad
    assert {j.preference for j in judgments} == {"A", "B"} and all(j.pair.label == j.preference for j in judgments)
