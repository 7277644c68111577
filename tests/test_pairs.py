import json

import pytest

from reflectagent.pairs import InvalidPair, Pair, read_pairs
from reflectagent.steps import fit_to_budget


def test_swapped_moves_responses_and_label():
    pair = Pair(prompt="p", response_a="one", response_b="two", label="A")
    swapped = pair.swapped()
    assert (swapped.response_a, swapped.response_b, swapped.label) == ("two", "one", "B")
    assert swapped.swapped() == pair


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": "  ", "response_a": "x", "response_b": "y"}, "prompt is empty"),
        ({"prompt": "p", "response_a": "", "response_b": " "}, "both responses are empty"),
        ({"prompt": "p", "response_a": "x", "response_b": "y", "label": "C"}, "label must be one of"),
        ({"prompt": "p", "response_a": 3, "response_b": "y"}, "must be a string"),
    ],
)
def test_invalid_pairs_say_why(fields, message):
    with pytest.raises(InvalidPair, match=message):
        Pair(**fields)


def test_one_empty_response_is_judgeable():
    assert Pair(prompt="p", response_a="", response_b="an answer").response_a == ""


def test_bad_lines_are_reported_with_numbers_and_the_rest_are_read(tmp_path):
    good = {"id": "1", "prompt": "p", "response_a": "a", "response_b": "b", "label": "A"}
    path = tmp_path / "pairs.jsonl"
    with open(path, "wb") as handle:
        handle.write((json.dumps(good) + "\n").encode())
        handle.write(b"{not json\n")
        handle.write((json.dumps({"prompt": "p", "response_a": "a"}) + "\n").encode())
        handle.write(b'{"prompt": "p", "response_a": "\xff\xfe", "response_b": "b"}\n')
        handle.write(b"\n")
        handle.write((json.dumps({**good, "id": 7, "label": "tie"}) + "\n").encode())
        handle.write((json.dumps([1, 2]) + "\n").encode())
    pairs, bad = read_pairs(path)
    assert [p.id for p in pairs] == ["1", "7"]
    assert [(b.line, b.error.split(":")[0]) for b in bad] == [
        (2, "not JSON"),
        (3, "missing field(s)"),
        (4, "not UTF-8 (byte 32 of the line)"),
        (7, "expected a JSON object, got list"),
    ]
    assert str(bad[0]).startswith(f"{path}:2: not JSON")


def test_fit_to_budget_keeps_short_texts_and_cuts_long_ones_visibly():
    texts = {"prompt": "short prompt", "response_a": "a" * 5000, "response_b": "b" * 300}
    fitted, cut = fit_to_budget(texts, 2000)
    assert cut == ("response_a",)
    assert fitted["prompt"] == texts["prompt"] and fitted["response_b"] == texts["response_b"]
    assert len(fitted["response_a"]) <= 2000 - len(texts["prompt"]) - 300
    assert "characters cut to fit" in fitted["response_a"]
    assert fitted["response_a"].startswith("aaa") and fitted["response_a"].endswith("aaa")
    assert fit_to_budget(texts, None) == (texts, ())
    assert fit_to_budget(texts, 10**6) == (texts, ())


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "response_a": "a", "response_b": "b"}).encode() + b"\r\n"
    )
    pairs, bad = read_pairs(path)
    assert [p.prompt for p in pairs] == ["p"] and bad == []


def test_a_lone_surrogate_escape_is_a_bad_line_that_says_what_to_fix(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text(
        '{"prompt": "p", "response_a": "x\\ud800y", "response_b": "b"}\n'
        '{"prompt": "p", "response_a": "a", "response_b": "b"}\n'
    )
    pairs, bad = read_pairs(path)
    assert len(pairs) == 1 and [b.line for b in bad] == [1]
    assert "response_a holds a lone surrogate escape" in bad[0].error and "character 2" in bad[0].error


def test_duplicate_ids_are_found():
    from reflectagent.pairs import duplicate_ids

    pairs = [
        Pair(prompt="p", response_a="a", response_b=str(i), id=key) for i, key in enumerate(["x", "y", "x", None, None])
    ]
    assert duplicate_ids(pair.id for pair in pairs) == {"x": 2}


def test_resume_advice_only_where_a_rerun_can_succeed():
    from dspy.utils.exceptions import LMTransportError

    from reflectagent.judge import RunInterrupted

    dropped = RunInterrupted(3, 10, LMTransportError("connection reset"))
    assert "run the same command again to resume" in str(dropped)
    broken = RunInterrupted(0, 1, UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert "run the same command again" not in str(broken) and "would stop here again. Fix the cause" in str(broken)


def test_a_pipe_a_broken_gzip_and_a_line_separator_in_utf16(tmp_path):
    import gzip
    import os
    import threading

    from reflectagent.pairs import PairFileError

    row = {"prompt": "p\u2028q", "response_a": "a", "response_b": "b"}
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n"))
    writer.start()
    assert len(read_pairs(fifo)[0]) == 2  # read from one handle: sniffing the start loses nothing
    writer.join()
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-16")
    pairs, bad = read_pairs(utf16)
    assert [p.prompt for p in pairs] == ["p\u2028q"] and bad == []
    broken = tmp_path / "cut.jsonl.gz"
    broken.write_bytes(gzip.compress((json.dumps(row) + "\n").encode() * 50)[:40])
    with pytest.raises(PairFileError, match="not a readable gzip file"):
        read_pairs(broken)


def test_a_pair_file_is_counted_once_and_read_again_as_judged(tmp_path):
    from reflectagent.pairs import PairFile, PairFileError, read_pairs

    rows = [{"prompt": f"p{i}", "response_a": "a", "response_b": "b", "id": f"id{i}"} for i in range(5)]
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "\n".join(json.dumps(row) for row in rows[:2])
        + "\nnot json\n"
        + "\n".join(json.dumps(row) for row in rows[2:])
        + "\n"
    )
    streamed = PairFile(path, limit=4)
    assert len(streamed) == 4 and streamed.ids == ["id0", "id1", "id2", "id3"]
    assert [bad.line for bad in streamed.bad_lines] == [3]  # reported once, at the start
    assert list(streamed) == read_pairs(path)[0][:4] == list(streamed)  # each iteration reads the file again

    path.write_text("\n".join(json.dumps(row) for row in reversed(rows)) + "\n")  # rewritten while judged
    with pytest.raises(PairFileError, match="changed while it was being judged .*pair 1 "):
        list(streamed)
    path.write_text(json.dumps(rows[0]) + "\n")  # cut short
    with pytest.raises(PairFileError, match="pair 2 is not the one"):
        list(streamed)
    path.write_text("\n".join(json.dumps({**row, "response_b": "edited"}) for row in rows) + "\n")  # same ids
    with pytest.raises(PairFileError, match="pair 1 is not the one"):
        list(streamed)


def test_the_shipped_sample_is_balanced_and_any_prefix_mixes_its_sources():
    from collections import Counter

    from reflectagent.pairs import sample_pairs

    pairs = sample_pairs()
    assert Counter(p.source for p in pairs) == {"pandalm_testset_v1": 12, "hhh_alignment": 12, "hh-rlhf": 8}
    assert Counter(p.label for p in pairs) == {"A": 16, "B": 16}
    assert len({p.source for p in sample_pairs(limit=3)}) == 3  # `judge --sample --limit N` is not N pairs of one set
