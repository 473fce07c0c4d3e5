"""Conversation history under a token budget (truncate / summarize) and the terminal chat."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignkit.chat.history import (
    SUMMARY_HEADER,
    PromptTooLong,
    SummaryCache,
    fit_history,
    model_summarizer,
    summary_request,
    with_summary,
)
from alignkit.data.tokenize import Formatting

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
FMT = Formatting()


def conversation(turns: int) -> list[dict]:
    """system, u1, a1, ..., u(turns): every message a few dozen tokens, all different."""
    messages = [SYSTEM]
    for i in range(1, turns + 1):
        messages.append({"role": "user", "content": f"Question {i}: what is {i} times {i + 3}, and why is the sky blue on day {i}?"})
        if i < turns:
            messages.append({"role": "assistant", "content": f"Answer {i}: {i * (i + 3)}; sunlight scatters off air molecules (day {i})."})
    return messages


def template_count(tokenizer, messages: list[dict]) -> int:
    """Independent count: the tokenizer's own tokenizing chat-template path."""
    return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])


def keep_last(messages: list[dict], turns_dropped: int) -> list[dict]:
    return [messages[0]] + messages[1 + 2 * turns_dropped :]


def test_truncate_drops_whole_oldest_turns_at_exact_budgets(tokenizer):
    messages = conversation(4)  # turns: (u1 a1) (u2 a2) (u3 a3) (u4)
    counts = [template_count(tokenizer, keep_last(messages, k)) for k in range(4)]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4

    whole = fit_history(messages, tokenizer, FMT, budget=counts[0])
    assert whole.dropped_turns == 0 and whole.messages == messages and len(whole.prompt_ids) == counts[0]

    for k in (1, 2, 3):
        exact = fit_history(messages, tokenizer, FMT, budget=counts[k])  # fits with exactly 0 tokens to spare
        assert exact.dropped_turns == k
        assert exact.messages == keep_last(messages, k)  # system kept, whole turns, last user message kept
        assert len(exact.prompt_ids) == counts[k]
        assert exact.prompt_ids == tokenizer.apply_chat_template(exact.messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        one_less = fit_history(messages, tokenizer, FMT, budget=counts[k - 1] - 1)  # one token short of k-1 dropped turns
        assert one_less.dropped_turns == k

    roles = [m["role"] for m in fit_history(messages, tokenizer, FMT, budget=counts[2]).messages]
    assert roles == ["system", "user", "assistant", "user"]
    with pytest.raises(PromptTooLong, match=f"needs {counts[3]} tokens"):
        fit_history(messages, tokenizer, FMT, budget=counts[3] - 1)


def test_truncate_without_system_and_with_separator_format(tokenizer):
    messages = conversation(3)[1:]  # no system message
    fmt = Formatting(use_chat_template="no", separator="\n### Response:\n")
    # the separator format, rendered by hand: prompt + separator + reply + eos ...
    eos = tokenizer.eos_token

    def by_hand(ms):
        text = "".join(m["content"] + ("\n### Response:\n" if m["role"] == "user" else eos) for m in ms)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    budget = by_hand(messages[2:])
    fitted = fit_history(messages, tokenizer, fmt, budget=budget)
    assert fitted.dropped_turns == 1 and fitted.messages == messages[2:] and len(fitted.prompt_ids) == budget


class RecordingSummarizer:
    """A configured summarizer: deterministic text, records every call."""

    def __init__(self, extra_words: int = 0):
        self.calls: list[tuple[str, list[dict]]] = []
        self.extra_words = extra_words

    def __call__(self, previous: str, dropped: list[dict], max_tokens: int) -> str:
        self.calls.append((previous, dropped))
        numbers = [m["content"].split(":")[0] for m in dropped]
        return f"[{previous}] covered {', '.join(numbers)}" + " filler" * self.extra_words


def summarized_count(tokenizer, messages, k, summary):
    return template_count(tokenizer, [with_summary(SYSTEM, summary)] + messages[1 + 2 * k :])


def test_summarize_replaces_dropped_turns_incrementally_and_caches(tokenizer):
    s_max = 48
    messages = conversation(4)
    summarizer, cache = RecordingSummarizer(), SummaryCache()
    # budget: room for 2 dropped turns + a summary of s_max tokens, not for 1 dropped turn
    budget = summarized_count(tokenizer, messages, 2, "") + s_max
    assert summarized_count(tokenizer, messages, 1, "") + s_max > budget
    fitted = fit_history(messages, tokenizer, FMT, budget, "summarize", summarizer, cache, s_max)
    assert fitted.dropped_turns == 2
    assert summarizer.calls == [("", messages[1:5])]  # u1 a1 u2 a2
    assert fitted.summary == "[] covered Question 1, Answer 1, Question 2, Answer 2"
    assert fitted.messages[0] == {"role": "system", "content": f"{SYSTEM['content']}\n\n{SUMMARY_HEADER}\n{fitted.summary}"}
    assert fitted.messages[1:] == messages[5:]
    assert len(fitted.prompt_ids) == summarized_count(tokenizer, messages, 2, fitted.summary) <= budget

    # the same conversation again: served from the cache, no new call
    again = fit_history(messages, tokenizer, FMT, budget, "summarize", summarizer, cache, s_max)
    assert again.summary == fitted.summary and len(summarizer.calls) == 1

    # two turns later: only the newly dropped turns go to the summarizer, with the old summary
    longer = conversation(6)
    assert longer[:8] == messages and longer[8]["role"] == "assistant"
    budget = summarized_count(tokenizer, longer, 4, "") + s_max
    grown = fit_history(longer, tokenizer, FMT, budget, "summarize", summarizer, cache, s_max)
    assert grown.dropped_turns == 4
    assert summarizer.calls[1] == (fitted.summary, longer[5:9])  # u3 a3 u4 a4, not u1..a4
    assert grown.summary == f"[{fitted.summary}] covered Question 3, Answer 3, Question 4, Answer 4"
    assert grown.messages[1:] == longer[9:]
    assert len(cache) == 2


def test_summary_longer_than_its_budget_is_clipped(tokenizer):
    s_max = 12
    messages = conversation(4)
    budget = summarized_count(tokenizer, messages, 2, "") + s_max
    fitted = fit_history(messages, tokenizer, FMT, budget, "summarize", RecordingSummarizer(extra_words=50), SummaryCache(), s_max)
    assert len(tokenizer(fitted.summary, add_special_tokens=False)["input_ids"]) <= s_max
    assert fitted.summary.startswith("[] covered Question 1")
    assert len(fitted.prompt_ids) <= budget


def test_summary_request_fits_the_summarizers_context(tokenizer):
    dropped = conversation(30)[1:59]
    ids = summary_request(tokenizer, FMT, "earlier: the user likes tea", dropped, max_prompt_tokens=200)
    text = tokenizer.decode(ids)
    assert len(ids) <= 200
    assert "Summary so far:\nearlier: the user likes tea" in text and "Answer 29" in text  # newest turns kept
    assert "Question 1:" not in text  # oldest cut
    full = summary_request(tokenizer, FMT, "", dropped[:4], max_prompt_tokens=2000)
    assert "User: Question 1:" in tokenizer.decode(full) and "Assistant: Answer 2:" in tokenizer.decode(full)


def test_model_summarizer_with_the_engine(tiny_model_dir, tokenizer):
    from alignkit.models import load_causal_lm
    from alignkit.batching import Engine

    engine = Engine(load_causal_lm(str(tiny_model_dir)), tokenizer).start()
    try:
        summarize = model_summarizer(tokenizer, FMT, engine.complete_text, context_length=512)
        messages = conversation(4)
        s_max = 10
        budget = summarized_count(tokenizer, messages, 2, "") + s_max
        fitted = fit_history(messages, tokenizer, FMT, budget, "summarize", summarize, SummaryCache(), s_max)
        # the summary is the model's greedy reply to the summary request (checked independently)
        from alignkit.generation import SamplingParams, generate

        request = summary_request(tokenizer, FMT, "", messages[1:5], 512 - s_max)
        out = generate(engine.model, tokenizer, [request], SamplingParams(max_new_tokens=s_max, temperature=0))
        expected = tokenizer.decode(out.response_ids[0][out.response_mask[0].bool()], skip_special_tokens=True).strip()
        assert fitted.dropped_turns == 2 and fitted.summary == expected
        assert len(fitted.prompt_ids) <= budget
    finally:
        engine.shutdown()


def test_unknown_strategy_and_bad_conversations(tokenizer):
    with pytest.raises(ValueError, match="truncate"):
        fit_history(conversation(2), tokenizer, FMT, 100, "forget")
    with pytest.raises(ValueError, match="end with a user message"):
        fit_history(conversation(2)[:-1], tokenizer, FMT, 100)
    with pytest.raises(ValueError, match="needs a summarizer"):
        fit_history(conversation(4), tokenizer, FMT, 120, "summarize")


# ------------------------------------------------------------------------------------------ terminal chat


def test_chat_command_streams_and_handles_commands(tiny_model_dir, tokenizer, tmp_path):
    from alignkit.data.tokenize import prompt_text
    from alignkit.generation import SamplingParams, generate_text
    from alignkit.models import load_causal_lm
    from alignkit.serve.commands import app

    saved, rows = tmp_path / "chat.json", tmp_path / "chats.jsonl"
    script = "\n".join([
        "/system Be brief.", "Hello there", "/history", f"/save {saved}", "/reset", "/history",
        "Second chat", f"/save {rows}", "/bogus", "/quit", "never read",
    ]) + "\n"
    result = CliRunner().invoke(app, ["chat", "--model_name_or_path", str(tiny_model_dir), "--temperature", "0", "--max_new_tokens", "6"], input=script)
    assert result.exit_code == 0, result.output

    model = load_causal_lm(str(tiny_model_dir))
    params = SamplingParams(max_new_tokens=6, temperature=0)

    def expected(messages):
        return generate_text(model, tokenizer, [prompt_text(tokenizer, messages, FMT)], params)[0]

    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    reply = expected(first)
    assert json.loads(saved.read_text()) == {"messages": first + [{"role": "assistant", "content": reply}]}
    second = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Second chat"}]
    assert [json.loads(line) for line in rows.read_text().splitlines()] == [{"messages": second + [{"role": "assistant", "content": expected(second)}]}]

    out = result.output
    assert f"assistant> {reply}\n" in out  # streamed piece by piece through write()
    assert "[user] Hello there" in out and "the last prompt had" in out
    after_reset = out.split("conversation cleared\n")[1]
    assert after_reset.startswith("you> [system] Be brief.\nyou> ")  # /history after /reset: only the system message
    assert "unknown command /bogus" in out and "never read" not in out


def test_chat_prefix_cache_flag(tiny_model_dir):
    """`alignkit chat --prefix_cache_mb`: the second turn's prompt starts with the first turn's prompt and reply, so with
    the cache (the default) /history reports a block-aligned part of it reused; with 0 MiB nothing is."""
    import re

    from alignkit.decode import BLOCK
    from alignkit.serve.commands import app

    script = "/system Be brief and kind.\nHello there, how are you today?\nTell me more about that.\n/history\n/quit\n"
    reused = {}
    for flags in ([], ["--prefix_cache_mb", "0"]):
        result = CliRunner().invoke(app, ["chat", "--model_name_or_path", str(tiny_model_dir), "--temperature", "0",
                                          "--max_new_tokens", "6", *flags], input=script)
        assert result.exit_code == 0, result.output
        tokens, cached = map(int, re.search(r"the last prompt had (\d+) tokens .*; (\d+) of them came from the prefix cache", result.output).groups())
        reused[bool(flags)] = (tokens, cached)
    tokens, cached = reused[False]
    assert cached >= BLOCK and cached % BLOCK == 0 and cached < tokens, reused
    assert reused[True] == (tokens, 0), reused


def test_chat_command_user_errors_exit_2(tiny_model_dir):
    from alignkit.serve.commands import app

    result = CliRunner().invoke(app, ["chat", "--model_name_or_path", str(tiny_model_dir), "--history_strategy", "forget"])
    assert result.exit_code == 2 and "error:" in result.output and "--history_strategy" in result.output and "truncate | summarize" in result.output


def test_terminal_truncates_and_reports(tiny_model_dir, tokenizer):
    from alignkit.chat.terminal import ChatSettings, run_chat
    from alignkit.models import load_causal_lm
    from alignkit.batching import Engine

    engine = Engine(load_causal_lm(str(tiny_model_dir)), tokenizer).start()
    lines = iter([f"message number {i} " + "word " * 30 for i in range(4)] + ["/history"])
    output: list[str] = []

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    try:
        settings = ChatSettings(max_new_tokens=4, temperature=0, context_length=120)
        session = run_chat(engine, FMT, settings, read=read, write=output.append)
    finally:
        engine.shutdown()
    assert len(session.turns) == 8  # the full conversation is kept; only the prompt is cut
    assert session.last_fit.dropped_turns >= 1 and len(session.last_fit.prompt_ids) <= 120 - 4
    assert "the model did not see the first" in "".join(output)
