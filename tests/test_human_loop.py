"""People in the loop: the web page as the judge of the pipeline's compare stage, and demonstrations.

The browser tests drive Debian's /usr/bin/chromium through Playwright (never a downloaded browser) against a
real uvicorn server on loopback and the tiny model; they skip when chromium or playwright is absent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.pipeline.human import collect_human_comparisons
from alignkit.serve.feedback import FeedbackStore, JudgeQueue, Judgment, comparison_rows, item_key, judge_items

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (CI installs Debian's chromium)")

# three pre-sampled items as the pipeline's compare stage hands them over; the last is ranked (K = 3)
ITEMS = [
    {"prompt": "What colour is the sky?", "responses": ["Blue, on a clear day.", "Bananas are yellow."]},
    {"prompt": "Add 2 and 3.", "responses": ["2 + 3 = 23", "2 + 3 = 5"]},
    {"prompt": "Name a planet.", "responses": ["Mars.", "A cheese.", "The moon is a planet."]},
]
# what the person prefers: per item, the responses from best to worst (the last item: the two worst tie)
PREFERRED = {"What colour is the sky?": ["Blue, on a clear day.", "Bananas are yellow."],
             "Add 2 and 3.": ["2 + 3 = 5", "2 + 3 = 23"]}
RANKS = {"Mars.": 1, "A cheese.": 2, "The moon is a planet.": 2}
EXPECTED_ROWS = [
    {"prompt": "What colour is the sky?", "chosen": "Blue, on a clear day.", "rejected": "Bananas are yellow."},
    {"prompt": "Add 2 and 3.", "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 23"},
    {"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "A cheese."},
    {"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "The moon is a planet."},
]


def as_set(rows: list[dict]) -> list[tuple]:
    """Rows without their order (a ranking's pairs come in the order its responses were shown)."""
    return sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows)


class Messages(logging.Handler):
    """The log lines of alignkit.pipeline.human, from any thread."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def human_log():
    logger, handler = logging.getLogger("alignkit.pipeline.human"), Messages()
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (CI installs Debian's chromium)")
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def judgment(prompt: str, responses: list[str], ranks: list[int], annotator: str = "ada") -> Judgment:
    return Judgment(f"id-{item_key(prompt, responses)}-{annotator}", annotator, "m", [{"role": "user", "content": prompt}], responses, ranks)


# ------------------------------------------------------------------------------------------ the queue, without a browser


def test_judge_items_drop_empty_and_repeated_responses_and_refuse_bad_items():
    items, dropped = judge_items([
        {"prompt": "p1", "responses": ["a", "", "a", "b"]},       # one empty, one repeated: 2 left
        {"prompt": "p2", "responses": ["same", "same", "  "]},   # 1 distinct: cannot be compared
        {"prompt": "p1", "responses": ["b", "a"]},               # the first item again
    ])
    assert [(i.prompt, i.responses) for i in items] == [("p1", ("a", "b"))]
    assert dropped == {"responses_empty_or_repeated": 4, "items_without_two_distinct_responses": 1, "items_repeated": 1}
    with pytest.raises(ValueError, match=r"items\[1\]\.responses"):
        judge_items([{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "q", "responses": "ab"}])
    with pytest.raises(ValueError, match=r"items\[0\]\.prompt"):
        judge_items([{"prompt": "", "responses": ["a", "b"]}])


def test_comparison_rows_are_every_pair_with_different_ranks():
    rows, ties = comparison_rows("p", judgment("p", ["x", "y", "z", "w"], [3, 1, 3, 2]))
    # independently: chosen has the smaller rank; x and z tie
    expected = {("y", "x"), ("w", "x"), ("y", "z"), ("y", "w"), ("w", "z")}
    assert {(r["chosen"], r["rejected"]) for r in rows} == expected and len(rows) == 5 and ties == 1
    assert comparison_rows("p", judgment("p", ["x", "y"], [1, 1])) == ([], 1)


def test_queue_serves_the_next_unjudged_item_and_counts_only_its_items(tmp_path):
    items, _ = judge_items(ITEMS)
    store = FeedbackStore(tmp_path / "f.db")
    queue = JudgeQueue(items, 2, store)
    first = queue.status()
    assert (first["judged"], first["needed"], first["item"]["index"]) == (0, 2, 0)
    assert sorted(first["item"]["responses"]) == sorted(ITEMS[0]["responses"])
    assert first["item"]["prompt"] == [{"role": "user", "content": ITEMS[0]["prompt"]}]
    store.add(judgment("Unrelated prompt", ["a", "b"], [1, 2]))                      # not a queue item
    store.add(judgment(ITEMS[1]["prompt"], ["2 + 3 = 5", "other"], [1, 2]))          # same prompt, other responses
    assert queue.status()["judged"] == 0
    store.add(judgment(ITEMS[1]["prompt"], list(reversed(ITEMS[1]["responses"])), [1, 2]))  # shown in another order
    status = queue.status(after=0)
    assert status["judged"] == 1 and status["item"]["index"] == 2   # item 1 is done: skipped
    assert queue.status(after=2)["item"]["index"] == 0              # wraps around
    store.add(judgment(ITEMS[0]["prompt"], ITEMS[0]["responses"], [2, 1]))
    assert queue.status() == {"judged": 2, "needed": 2, "items": 3, "item": None}  # enough: nothing more to show


def test_a_store_that_already_holds_the_judgments_returns_at_once(tmp_path, monkeypatch, human_log):
    """No model is loaded and no server started when the store has them; one judgment short, it serves."""
    import alignkit.serve.app

    class Served(Exception):
        pass

    def refuse_to_serve(cfg):
        raise Served(cfg.model_name_or_path)

    monkeypatch.setattr(alignkit.serve.app, "load_state", refuse_to_serve)
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    store.add(judgment(ITEMS[0]["prompt"], ITEMS[0]["responses"], [1, 2]))
    store.add(judgment(ITEMS[1]["prompt"], ITEMS[1]["responses"], [2, 1]))
    with pytest.raises(Served):  # 2 of 3: it would serve the page
        collect_human_comparisons("no/such/model", ITEMS, db, needed=3)
    shown = ["The moon is a planet.", "Mars.", "A cheese."]
    store.add(judgment(ITEMS[2]["prompt"], shown, [RANKS[r] for r in shown]))
    store.add(judgment(ITEMS[0]["prompt"], ITEMS[0]["responses"], [2, 1], annotator="bob"))  # a later, other opinion: unused
    rows = collect_human_comparisons("no/such/model", ITEMS, db, needed=3)
    assert as_set(rows) == as_set(EXPECTED_ROWS) and len(rows) == 4 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert as_set(collect_human_comparisons("no/such/model", ITEMS, db, needed=2)) == as_set(EXPECTED_ROWS)  # all judged items count
    assert any("already holds 3 of 3 comparisons" in line for line in human_log)
    assert any("dropped 1 tied pair(s)" in line for line in human_log)
    with pytest.raises(ValueError, match="needed: 4 judgments asked for, but there are 3 items"):
        collect_human_comparisons("no/such/model", ITEMS, db, needed=4)


# ------------------------------------------------------------------------------------------ in the browser


def wait_for_url(lines: list[str], thread: threading.Thread, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        for line in list(lines):
            match = re.search(r"open (http://\S+)/ in a browser", line)
            if match:
                return match.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no URL was logged: {lines}")


def wait_for_line(lines: list[str], wanted: str) -> None:
    deadline = time.monotonic() + 30
    while wanted not in lines:
        assert time.monotonic() < deadline, f"{wanted!r} was not logged: {lines}"
        time.sleep(0.05)


@needs_chromium
def test_people_judge_the_pipeline_samples_in_the_browser(tiny_model_dir, browser, tmp_path, human_log):
    from playwright.sync_api import expect

    db = tmp_path / "feedback.db"
    result: dict = {}

    def collect():
        try:
            result["rows"] = collect_human_comparisons(str(tiny_model_dir), ITEMS, db, needed=3, timeout_s=180)
        except Exception as error:  # reported by the assertion below
            result["error"] = error

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    url = wait_for_url(human_log, thread)
    page = browser.new_page()
    try:
        page.goto(url + "/")
        progress = page.locator("#judge-progress")
        expect(progress).to_have_text("0 of 3 comparisons", timeout=30_000)
        expect(page.locator("#free-compare")).to_be_hidden()
        first_prompt = page.locator("#judge-prompt").text_content()
        page.click("#judge-skip")
        expect(page.locator("#judge-prompt")).not_to_have_text(first_prompt)

        # on the first prompt shown, the person writes an ideal answer before judging
        page.click("#judge-demo")
        prompt_now = page.locator("#judge-prompt").text_content()
        assert page.input_value("#demo-prompt") == prompt_now
        page.fill("#demo-answer", "An ideal answer.")
        page.click("#demo-submit")
        expect(page.locator("#demo-status")).to_have_attribute("data-total", "1", timeout=15_000)
        page.click("#tab-compare")

        for judged in range(1, 4):
            prompt = page.locator("#judge-prompt").text_content()
            cards = page.locator("#compare-responses .card .text")
            cards.nth(1).wait_for(timeout=15_000)
            shown = cards.all_text_contents()
            if prompt in PREFERRED:
                assert len(shown) == 2 and sorted(shown) == sorted(PREFERRED[prompt])
                page.click(f"#pair-choice button[data-choice='{shown.index(PREFERRED[prompt][0])}']")
            else:
                assert sorted(shown) == sorted(RANKS)
                selects = page.locator("#compare-responses select.rank")
                for i, text in enumerate(shown):
                    selects.nth(i).select_option(str(RANKS[text]))
                page.click("#submit-ranking")
            wait_for_line(human_log, f"{judged} of 3 comparisons")  # logged by the waiting function as it arrives
            if judged < 3:
                expect(progress).to_have_text(f"{judged} of 3 comparisons", timeout=15_000)
                expect(page.locator("#judge-prompt")).not_to_have_text(prompt)
        thread.join(timeout=60)
    finally:
        page.close()
    assert not thread.is_alive() and "error" not in result, result
    assert as_set(result["rows"]) == as_set(EXPECTED_ROWS) and len(result["rows"]) == 4
    progress_lines = [line for line in human_log if re.fullmatch(r"\d of 3 comparisons", line)]
    assert progress_lines == ["1 of 3 comparisons", "2 of 3 comparisons", "3 of 3 comparisons"]
    with sqlite3.connect(db) as connection:
        [(prompt, completion)] = connection.execute("SELECT prompt, completion FROM demonstrations").fetchall()
    assert json.loads(prompt) == [{"role": "user", "content": prompt_now}] and completion == "An ideal answer."


@needs_chromium
def test_a_demonstration_written_in_the_page_becomes_sft_data(tiny_model_dir, browser, tmp_path):
    import httpx
    from playwright.sync_api import expect

    from alignkit.cli import app as cli
    from alignkit.data.formats import load_sft_examples
    from alignkit.serve.app import BackgroundServer, ServeConfig, create_app, load_state

    db = tmp_path / "feedback.db"
    state = load_state(ServeConfig(str(tiny_model_dir), served_model_name="tiny", feedback_db=str(db)))
    state.feedback.add(judgment("Pick one.", ["this", "that"], [2, 1]))
    answer = "Rain taps the window,\nthe kettle hums along."
    try:
        with BackgroundServer(create_app(state)) as server:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.click("#tab-demo")
            page.fill("#demo-prompt", "Write a short poem about rain.")
            page.fill("#demo-answer", answer)
            page.click("#demo-submit")
            expect(page.locator("#demo-status")).to_have_attribute("data-total", "1", timeout=15_000)
            assert page.input_value("#demo-answer") == ""
            page.close()
            refused = httpx.post(server.url + "/api/demonstrations", json={"id": "x" * 12, "annotator": "ada", "prompt": "Hi", "completion": " "})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "completion"
    finally:
        state.engine.shutdown()

    out = tmp_path / "demos.jsonl"
    runner = CliRunner()
    bad = runner.invoke(cli, ["feedback", "export", "--feedback_db", str(db), "--output", str(out), "--kind", "answers"])
    assert bad.exit_code == 2 and "--kind: 'answers' is not allowed; one of: preferences | demonstrations" in bad.output and not out.exists()
    done = runner.invoke(cli, ["feedback", "export", "--feedback_db", str(db), "--output", str(out), "--kind", "demonstrations"])
    assert done.exit_code == 0, done.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["prompt"], row["completion"], row["annotator"], row["model"]) == ("Write a short poem about rain.", answer, "anonymous", "tiny")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # written under a temporary name, renamed

    prefs = tmp_path / "prefs.jsonl"  # the default kind is unchanged: the judgments as preference rows
    assert runner.invoke(cli, ["feedback", "export", "--feedback_db", str(db), "--output", str(prefs)]).exit_code == 0
    assert [(r["chosen"], r["rejected"]) for r in map(json.loads, prefs.read_text().splitlines())] == [("that", "this")]

    examples, fmt = load_sft_examples(str(out))
    assert fmt == "prompt_completion"
    assert examples == [{"messages": [{"role": "user", "content": "Write a short poem about rain."}, {"role": "assistant", "content": answer}]}]
    trained = runner.invoke(cli, ["sft", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(out), "--output_dir", str(tmp_path / "sft"),
                                  "--max_steps", "1", "--per_device_train_batch_size", "1", "--logging_steps", "1", "--no_progress", "--max_length", "64"])
    assert trained.exit_code == 0, trained.output
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and metrics[-1]["loss"] > 0


# ------------------------------------------------------------------------------------------ the whole pipeline with people as the judge

ROOT = Path(__file__).resolve().parents[1]


def judge_through_the_api(url: str, needed: int) -> list[dict]:
    """What the page does for a person: fetch the next item (GET /api/judge), store a ranking (POST /api/feedback).
    This person prefers shorter answers (equal lengths tie). Returns the judgments posted."""
    import uuid

    import httpx

    posted = []
    with httpx.Client(base_url=url, timeout=60) as client:
        while True:
            status = client.get("/api/judge").json()
            if status["item"] is None:
                assert status["judged"] >= needed
                return posted
            responses = status["item"]["responses"]
            lengths = sorted(set(map(len, responses)))
            body = {"id": uuid.uuid4().hex, "annotator": "ada", "prompt": status["item"]["prompt"], "responses": responses,
                    "ranks": [lengths.index(len(r)) + 1 for r in responses]}
            answer = client.post("/api/feedback", json=body)
            assert answer.status_code == 200 and answer.json()["stored"], answer.text
            posted.append(body)


@pytest.mark.timeout(2400)  # a whole --quick pipeline run and a rerun of compare: 3-4 min on a quiet machine, far more under load
def test_a_pipeline_with_people_as_the_judge_continues_to_the_report(tmp_path):
    """recipes/human.yaml --quick: the compare stage serves the page and waits; judgments arrive through the page's API
    (the browser itself is driven in the tests above); the run then trains rm, ppo and dpo on those judgments and writes
    the report. The judgments survive a rerun of compare, which then serves nothing and makes the same pairs."""
    import subprocess
    import sys

    recipe = tmp_path / "human.yaml"
    recipe.write_text((ROOT / "recipes" / "human.yaml").read_text().replace("human_port: 8008", "human_port: 0"))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "alignkit.cli", "pipeline", str(recipe), "--output_dir", str(run), "--quick"]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        url = wait_for_url(lines, reader, timeout_s=1200)  # after data, sft and sampling
        needed = 4  # recipe.QUICK_DEFAULTS compare.human_needed
        posted = judge_through_the_api(url, needed)
        assert child.wait(timeout=1500) == 0, "".join(lines)[-4000:]
    finally:
        if child.poll() is None:
            child.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert len(posted) == needed and f"{needed} of {needed} comparisons" in output
    for stage in ("rm", "ppo", "dpo", "eval", "report"):
        assert f"{stage}: done in" in output and json.loads((run / stage / "stage.json").read_text())["status"] == "done", stage
    assert (run / "report.md").exists() and json.loads((run / "report.json").read_text())["eval"]
    pairs = [json.loads(line) for name in ("pairs_train", "pairs_heldout") for line in (run / "compare" / f"{name}.jsonl").read_text().splitlines()]
    assert pairs and all(len(p["chosen"]) < len(p["rejected"]) for p in pairs)  # the person's rule, and only theirs
    judged_prompts = {b["prompt"][-1]["content"] for b in posted}
    assert {p["prompt"] for p in pairs} <= judged_prompts

    again = subprocess.run(command + ["--only", "compare", "--force"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"already holds {needed} of {needed} comparisons: not serving" in again.stdout + again.stderr
    repeated = [json.loads(line) for name in ("pairs_train", "pairs_heldout") for line in (run / "compare" / f"{name}.jsonl").read_text().splitlines()]
    assert repeated == pairs
