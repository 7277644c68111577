"""The HTML page of an eval run or a judgments file.

Fast tests build pages from fake-LM judgments (what goes in, what is escaped, how big it gets); the browser
tests open the page of a real eval run (``eval_report``: the embedded vLLM server) in headless Chromium and
click through it, and prove that markup in a response stays text.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

from conftest import HOSTILE
from fakes import PAIR, fair_analyst
from reflectagent.eval import run_eval, write_report
from reflectagent.eval.page import PageError, PageData, from_judgments_file, render, view
from reflectagent.pairs import Pair
from reflectagent.programs import GenRM
from reflectagent.results import Analysis, Judgment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BENCH_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
HOSTILE_PAIR = Pair(id="x1", prompt="Capital of France?", response_a=HOSTILE, response_b="Berlin.", label="A")


def fake_report(tmp_path, pairs):
    from reflectagent.eval.runner import EvalRun

    results = run_eval(pairs, [EvalRun("genrm-both", "fake", GenRM(both_orders=True), fair_analyst())], progress=False)
    return write_report(
        results, tmp_path / "report", meta={"data": ["fake"], "pairs": len(pairs), "split": "all", "seed": 0}
    )


def embedded_data(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))


def test_every_eval_folder_gets_a_page_with_its_judgments_embedded_once(cache, tmp_path):
    folder = fake_report(tmp_path, [PAIR, HOSTILE_PAIR])
    html = (folder / "report.html").read_text()
    data = embedded_data(html)
    assert [p["id"] for p in data["pairs"]] == ["#1", "x1"]  # a pair without an id is numbered
    assert len(data["judgments"]) == 2 and all(len(j[2]) == 2 for j in data["judgments"])  # both presentations
    assert data["runs"][0]["label"] == "genrm-both @ fake" and "[" in data["runs"][0]["cells"][0]  # accuracy with CI
    assert html.count("Capital of France?") == 1  # the data once, not once per run or row
    assert "data:image/png;base64," in html  # plots inlined: nothing to fetch


def test_markup_in_a_response_never_reaches_the_page_as_markup(cache, tmp_path):
    html = (fake_report(tmp_path, [HOSTILE_PAIR]) / "report.html").read_text()
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert embedded_data(html)["pairs"][0]["response_a"] == HOSTILE  # still all there, as data
    assert not re.search(r"(src|href)=\"https?://", html)  # no CDN, no network


def test_the_swapped_presentation_is_shown_in_the_original_order(cache, tmp_path):
    data = embedded_data((fake_report(tmp_path, [PAIR]) / "report.html").read_text())
    as_given, swapped = data["judgments"][0][2]
    assert as_given["preference"] == swapped["preference"] == "A"  # the fair analyst is right both times
    assert [a["swapped"] for a in swapped["analyses"]] == [True, False]  # its first analysis saw B first
    assert [a["preference"] for a in swapped["analyses"]] == ["A", "A"]


def test_view_of_a_judgments_file_and_of_two_runs_side_by_side(cache, tmp_path):
    lines = []
    for pair, preference in ((PAIR, "A"), (HOSTILE_PAIR, None)):
        judgment = Judgment(
            preference=preference,
            reason=None if preference else "unparsed",
            program="GenRM",
            analyses=(Analysis(text="t", preference=preference, swapped=False, parsed=bool(preference), raw="{"),),
        )
        lines.append(json.dumps({"pair": pair.to_dict(), "judgment": judgment.to_dict()}))
    judged = tmp_path / "judged.jsonl"
    judged.write_text("\n".join(lines) + "\n")
    page = view(judged)
    assert page == tmp_path / "judged.html"
    data = embedded_data(page.read_text())
    assert data["runs"][0]["cells"][:2] == ["1", "50.0%"] and len(data["judgments"]) == 2
    folder = fake_report(tmp_path, [PAIR])
    both = embedded_data(view(folder, against=judged, out=tmp_path / "both.html").read_text())
    assert [r["label"].split(":")[0] for r in both["runs"]] == ["before", "after"]
    assert len(both["pairs"]) == 2  # PAIR matched across the two by id


def test_view_says_what_to_give_it(tmp_path):
    with pytest.raises(PageError, match="does not exist"):
        view(tmp_path / "nothing")
    with pytest.raises(PageError, match="holds no report.json"):
        view(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"pair": {}}\n')
    with pytest.raises(PageError, match="line 1: not a line of `reflectagent judge -o`"):
        from_judgments_file(tmp_path / "bad.jsonl")


def test_the_cli_writes_the_page_and_prints_its_path(cache, tmp_path):
    folder = fake_report(tmp_path, [PAIR])
    (folder / "report.html").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "reflectagent.cli", "view", str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(folder / "report.html") and (folder / "report.html").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "reflectagent.cli", "view", str(tmp_path / "no")], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "error:" in missing.stderr and "does not exist" in missing.stderr


@pytest.mark.parametrize("name", sorted(p.parent.name for p in BENCH_RESULTS.glob("*/judgments.jsonl.gz")))
def test_a_committed_bench_report_gets_its_page_back_from_its_json_and_judgments(name, tmp_path):
    """bench/results keeps report.json and judgments.jsonl.gz, not the page (one template's copy, megabytes a run):
    `reflectagent view FOLDER` writes it again, every run and every judgment of the report on it."""
    folder = BENCH_RESULTS / name
    data = embedded_data(view(folder, out=tmp_path / "report.html").read_text())
    runs = json.loads((folder / "report.json").read_text())["runs"]
    assert [(r["program"], r["backend"]) for r in data["runs"]] == [(r["program"], r["backend"]) for r in runs]
    assert [r["cells"][0].split(" [")[0] for r in data["runs"]] == [
        f"{r['overall']['accuracy']['value']:.1%}" for r in runs
    ]
    with gzip.open(folder / "judgments.jsonl.gz", "rt", encoding="utf-8") as handle:
        assert len(data["judgments"]) == sum(1 for _ in handle)


def big_page(pairs: int) -> PageData:
    data = PageData(
        title="big", columns=["accuracy"], runs=[{"label": "r", "program": "r", "backend": "", "cells": ["-"]}]
    )
    for i in range(pairs):
        pair = Pair(
            id=f"p{i}",
            prompt=f"prompt {i} " * 20,
            response_a="a " * 100,
            response_b="b " * 100,
            label="AB"[i % 2],
            source=f"s{i % 3}",
        )
        judgment = Judgment(
            preference="A",
            analyses=(Analysis(text="because " * 30, preference="A", swapped=False, parsed=True, raw=""),),
        )
        data.add(0, pair, [judgment], [False])
    return data


def test_a_page_of_ten_thousand_pairs_stays_one_file_of_reasonable_size(tmp_path):
    html = render(big_page(10_000))
    assert len(html) < 60_000_000 and len(embedded_data(html)["pairs"]) == 10_000


# ---- in a real browser -------------------------------------------------------------------------------------------


def in_browser(test):
    """A test on the real eval's page in headless Chromium (needs the server, Chromium and playwright)."""
    marks = [
        pytest.mark.server,
        pytest.mark.browser,
        pytest.mark.skipif(
            CHROMIUM is None,
            reason="Chromium is not installed (scripts/test.sh installs Debian's `chromium` where apt-get "
            "can; elsewhere install it to run the page tests)",
        ),
    ]
    for mark in marks:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    with sync_api.sync_playwright() as driver:
        instance = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture
def page(chromium, eval_report):
    tab = chromium.new_page(viewport={"width": 1280, "height": 900})
    tab.dialogs = []
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    tab.goto((eval_report / "report.html").as_uri())
    yield tab
    tab.close()


def rows(tab):
    return tab.locator("#pairs-body tr")


@in_browser
def test_the_page_renders_with_its_table_and_plots(page, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 900)
    histogram = image.histogram()
    assert sum(1 for count in histogram if count) > 40  # text, tables and plots, not a blank page
    assert page.locator("#summary tbody tr").count() == 2
    assert page.locator(".plots img").count() == 3 and page.evaluate(
        "[...document.images].every(i => i.naturalWidth > 0)"
    )
    assert page.locator(".plots img[alt='reliability']").count() == 1  # the calibration plot beside the other two
    assert rows(page).count() == 7 and "7 of 7 pairs" in page.locator("#page-info").inner_text()


@in_browser
def test_a_filter_changes_the_visible_rows(page, eval_report):
    assert rows(page).count() == 7
    page.select_option("#f-source", "handmade")
    assert rows(page).count() == 1 and "hostile-1" in rows(page).first.inner_text()
    page.select_option("#f-source", "")
    page.select_option("#f-run", index=1)  # one run: one verdict column
    assert page.locator("#pairs-head th").count() == 5
    run = int(page.locator("#f-run").input_value())
    outcomes = {o: (page.select_option("#f-outcome", o), rows(page).count())[1] for o in ("right", "wrong", "none")}

    # what each outcome should show, from the judgments the page carries: the pairs with a presentation of that
    # outcome in the chosen run (two presentations: at most two outcomes a pair, so some filter hides a pair)
    data = embedded_data((eval_report / "report.html").read_text())
    expected = dict.fromkeys(outcomes, 0)
    for run_index, pair_index, presentations in data["judgments"]:
        if run_index == run:
            label, seen = data["pairs"][pair_index]["label"], set()
            for judged in presentations:
                seen.add("none" if not judged["preference"] else "right" if judged["preference"] == label else "wrong")
            for outcome in seen:
                expected[outcome] += 1
    assert outcomes == expected and min(outcomes.values()) < 7


@in_browser
def test_a_drill_down_shows_the_analyses_and_reflections(page, eval_report):
    import gzip

    rows(page).first.click()
    detail = page.locator("#detail")
    assert detail.is_visible()
    first = json.loads(gzip.open(eval_report / "judgments.jsonl.gz", "rt").readline())
    text = detail.inner_text()
    assert first["pair"]["prompt"][:40] in text
    assert detail.locator(".run").count() == 2  # GenRM and ReflectRM side by side
    assert detail.locator(".analysis").count() >= 2 and detail.locator(".reflection").count() >= 1
    shown = [a["text"] for j in first["judgments"] for a in j["analyses"] if a["parsed"] and a["text"].strip()]
    assert any(t.strip()[:30] in text for t in shown)


@in_browser
def test_a_response_with_a_script_shows_as_text_and_never_runs(page):
    page.fill("#f-text", "hostile")
    assert rows(page).count() == 1
    rows(page).first.click()
    page.wait_for_timeout(300)
    assert HOSTILE in page.locator("#detail").inner_text()
    assert page.dialogs == [] and page.locator("#detail script, #detail img").count() == 0


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (scripts/test.sh installs Debian's `chromium` where "
    "apt-get can; elsewhere install it to run the page tests)",
)
def test_ten_thousand_pairs_page_and_filter_in_the_browser(chromium, tmp_path):
    page_file = tmp_path / "big.html"
    page_file.write_text(render(big_page(10_000)))
    tab = chromium.new_page()
    tab.goto(page_file.as_uri())
    assert tab.locator("#pairs-body tr").count() == 50
    assert tab.locator("#page-info").inner_text() == "10000 of 10000 pairs, page 1 of 200"
    tab.click("#next")
    assert tab.locator("#pairs-body tr").first.inner_text().startswith("p50")
    tab.select_option("#f-source", "s1")
    assert tab.locator("#page-info").inner_text() == "3333 of 10000 pairs, page 1 of 67"
    tab.fill("#f-text", "prompt 9999 ")
    assert tab.locator("#pairs-body tr").count() == 0  # p9999 is in s0
    tab.select_option("#f-source", "")
    assert tab.locator("#pairs-body tr").count() == 1
    tab.close()


def test_the_swapped_judgment_s_probability_and_ratings_are_named_in_the_original_order():
    from reflectagent.eval.page import slim
    from reflectagent.results import Rating

    judgment = Judgment(
        preference="A", probability_a=0.8, ratings=(Rating(response="A", rating=5, parsed=True, raw=""),)
    )
    shown = slim(judgment, swapped=True)
    assert (shown["preference"], shown["probability_a"], shown["ratings"][0]["response"]) == ("B", 0.2, "B")


def test_two_pairs_sharing_an_id_get_two_rows():
    data = PageData(title="t")
    first = Pair(id="same", prompt="p", response_a="a", response_b="b")
    second = Pair(id="same", prompt="p", response_a="c", response_b="d")
    assert data.pair_index(first) == 0 and data.pair_index(second) == 1 and data.pair_index(first) == 0
