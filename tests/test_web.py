"""The web page in a real browser (Debian's chromium through Playwright; never a downloaded browser):
streamed chat, and comparisons stored in SQLite and exported, also across a server restart."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

expect = pytest.importorskip("playwright.sync_api").expect

from alignkit.data.tokenize import Formatting, prompt_text
from alignkit.generation import SamplingParams, generate_text
from alignkit.serve.app import BackgroundServer, ServeConfig, create_app, load_state
from alignkit.serve.feedback import FeedbackStore, export_preferences

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MODEL = "tiny-web"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (CI installs Debian's chromium)")


@pytest.fixture(scope="module")
def state(tiny_model_dir, tmp_path_factory):
    from test_serve import lively_model_dir

    model_dir = lively_model_dir(tiny_model_dir, tmp_path_factory.mktemp("lively-web") / "model")
    db = tmp_path_factory.mktemp("web") / "feedback.db"
    state = load_state(ServeConfig(str(model_dir), served_model_name=MODEL, context_length=256, feedback_db=str(db)))
    yield state
    state.engine.shutdown()


@pytest.fixture(scope="module")
def browser():
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def greedy(state, messages, max_tokens):
    text = prompt_text(state.tokenizer, messages, Formatting())
    return generate_text(state.engine.model, state.tokenizer, [text], SamplingParams(max_new_tokens=max_tokens, temperature=0))[0]


def settings(page, temperature, max_tokens, annotator="ada"):
    page.click("#tab-settings")
    page.fill("#set-temperature", str(temperature))
    page.fill("#set-max-tokens", str(max_tokens))
    page.fill("#set-annotator", annotator)
    page.locator("#set-annotator").dispatch_event("change")


def test_chat_view_streams_a_reply(state, browser):
    with BackgroundServer(create_app(state)) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#model-name")).to_contain_text("tiny-web · context")
        settings(page, temperature=0, max_tokens=12)
        page.click("#tab-chat")
        page.fill("#chat-input", "Hello there, browser!")
        page.click("#chat-send")
        reply = page.locator(".message.assistant[data-done=true]")
        reply.wait_for(timeout=30_000)
        expected = greedy(state, [{"role": "user", "content": "Hello there, browser!"}], 12)
        assert reply.locator(".content").text_content() == expected and expected.strip()
        assert int(reply.get_attribute("data-chunks")) > 1  # arrived piece by piece

        # a second turn carries the history
        page.fill("#chat-input", "And again?")
        page.keyboard.press("Enter")
        page.locator(".message.assistant[data-done=true]").nth(1).wait_for(timeout=30_000)
        history = [{"role": "user", "content": "Hello there, browser!"}, {"role": "assistant", "content": expected},
                   {"role": "user", "content": "And again?"}]
        assert page.locator(".message.assistant .content").nth(1).text_content() == greedy(state, history, 12)
        page.close()


def stored_rows(db):
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT annotator, model, prompt, responses, ranks, sampling FROM judgments ORDER BY created_at").fetchall()
    return [(a, m, json.loads(p), json.loads(r), json.loads(k), json.loads(s)) for a, m, p, r, k, s in rows]


def test_comparison_view_stores_judgments_through_a_restart(state, browser, tmp_path):
    db = tmp_path / "judgments.db"
    first_state = replace(state, feedback=FeedbackStore(db))
    server = BackgroundServer(create_app(first_state)).start()
    port = server.port
    page = browser.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#model-name")).to_contain_text("tiny-web · context")
    settings(page, temperature=1.0, max_tokens=8, annotator="grace")
    page.click("#tab-compare")

    # 1. a typed prompt, two responses, A is better
    page.fill("#compare-prompt", "Write a haiku about rain.")
    page.click("#compare-sample")
    page.locator("#compare-responses .card").nth(1).wait_for(timeout=30_000)
    shown = page.locator("#compare-responses .card .text").all_text_contents()
    page.click("#pair-choice button[data-choice='0']")
    expect(page.locator("#feedback-status")).to_have_attribute("data-total", "1", timeout=15_000)
    [(annotator, model, prompt, responses, ranks, sampling)] = stored_rows(db)
    assert (annotator, model, prompt, ranks) == ("grace", MODEL, [{"role": "user", "content": "Write a haiku about rain."}], [1, 2])
    assert responses == shown and sampling == {"temperature": 1.0, "top_p": 0.95, "max_tokens": 8, "n": 2}

    # 2. the server goes down while the annotator judges: the judgment waits in the page, then arrives
    page.fill("#compare-prompt", "Name three fruits.")
    page.click("#compare-sample")
    page.locator("#compare-responses .card").nth(1).wait_for(timeout=30_000)
    second_shown = page.locator("#compare-responses .card .text").all_text_contents()
    server.stop()
    page.click("#pair-choice button[data-choice='1']")
    expect(page.locator("#feedback-status")).to_have_attribute("data-pending", "1", timeout=15_000)
    assert len(stored_rows(db)) == 1
    restarted = BackgroundServer(create_app(replace(state, feedback=FeedbackStore(db))), port=port).start()
    try:
        expect(page.locator("#feedback-status")).to_have_attribute("data-pending", "0", timeout=30_000)
        rows = stored_rows(db)
        assert len(rows) == 2 and rows[1][3] == second_shown and rows[1][4] == [2, 1]

        # 3. prompts from a file, three responses ranked
        prompt_file = tmp_path / "prompts.jsonl"
        prompt_file.write_text(json.dumps({"prompt": "First file prompt"}) + "\n" + json.dumps({"prompt": "Second file prompt"}) + "\n")
        page.set_input_files("#prompt-file", str(prompt_file))
        expect(page.locator("#prompt-position")).to_have_text("1 / 2")
        assert page.input_value("#compare-prompt") == "First file prompt"
        page.select_option("#compare-k", "3")
        page.click("#compare-sample")
        page.locator("#compare-responses .card").nth(2).wait_for(timeout=30_000)
        ranked = page.locator("#compare-responses .card .text").all_text_contents()
        selects = page.locator("#compare-responses select.rank")
        for i, rank in enumerate(["2", "3", "1"]):
            selects.nth(i).select_option(rank)
        page.click("#submit-ranking")
        expect(page.locator("#feedback-status")).to_have_attribute("data-total", "3", timeout=15_000)
        assert page.input_value("#compare-prompt") == "Second file prompt"  # moved on to the next prompt
    finally:
        page.close()
        restarted.stop()

    rows = stored_rows(db)
    assert rows[2][2] == [{"role": "user", "content": "First file prompt"}] and rows[2][3] == ranked and rows[2][4] == [2, 3, 1]

    # the export holds all three, readable by the preference loader that `alignkit rm` / `alignkit dpo` use
    out = tmp_path / "prefs.jsonl"
    assert export_preferences(db, out) == {"pairs": 2, "rankings": 1}
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert (exported[0]["chosen"], exported[0]["rejected"]) == (shown[0], shown[1])
    assert (exported[1]["chosen"], exported[1]["rejected"]) == (second_shown[1], second_shown[0])
    assert exported[2]["responses"] == [ranked[2], ranked[0], ranked[1]]

    from alignkit.data.preferences import load_preferences

    examples = load_preferences(str(out))
    assert [e.prompt[-1]["content"] for e in examples] == ["Write a haiku about rain.", "Name three fruits.", "First file prompt"]
    assert examples[2].pairs == [(0, 1), (0, 2), (1, 2)]
