"""Self-Instruct: exact fast ROUGE-L, filters, parsing, the loop with a deterministic fake generator (pool growth,
in-context sampling, output-first classification, resume), the HTTP backend against a fake OpenAI-compatible
server, the CLI, and a short run with the built-in model."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import typer
from fastapi import FastAPI, Request  # module level: the endpoints' annotations are resolved in module globals
from fastapi.responses import JSONResponse
from rouge_score import rouge_scorer
from typer.testing import CliRunner

from alignkit.data import self_instruct as si
from alignkit.data import self_instruct_prompts as sip
from alignkit.data.formats import DataError, load_sft_examples
from alignkit.data.generators import Completion, OpenAIGenerator, RequestFailed, cut_at_stop
from alignkit.data.similarity import RougePool, lcs_lengths, rouge_tokens
from learning import self_instruct_short_run

SCORER = rouge_scorer.RougeScorer(["rougeL"])
WORDS = (Path(si.__file__).with_name("words.txt")).read_text().split()


def reference_f(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


# ---------------------------------------------------------------------------------------------- similarity


def random_text(rng: random.Random, n: int) -> str:
    vocab = WORDS[:40] + ["The", "a", "of", "don't", "e-mail", "3.5", "naïve", "café", "!!", "A1"]
    return rng.choice(["", " ", "- "]) + " ".join(rng.choice(vocab) for _ in range(n)) + rng.choice(["", ".", "?", " :)"])


def test_pool_scores_equal_rouge_score_exactly_on_random_pairs():
    rng = random.Random(0)
    short, long = [0, 1, 2, 3, 5, 8, 13, 21, 30], [63, 64, 65, 128, 129, 150]  # one, two and three 64-bit words
    pool_texts = [random_text(rng, rng.choice(short)) for _ in range(120)] + [random_text(rng, n) for n in long]
    pool_texts += ["", "!!! ???", "Ünïcödé only"]
    pool = RougePool(pool_texts)
    for i in range(60):
        query = random_text(rng, rng.choice(long if i % 10 == 0 else short))
        expected = np.array([reference_f(query, text) for text in pool_texts])
        assert np.array_equal(pool.scores(query), expected)  # bit for bit, ~7,700 pairs in all
        match = pool.best_match(query)
        assert match.score == expected.max()
        if expected.max() > 0:
            assert match.index == int(np.argmax(expected))


def test_bit_parallel_lcs_matches_dynamic_programming_across_word_boundaries():
    rng = random.Random(1)
    for m in (1, 63, 64, 65, 127, 128, 129, 190):
        pattern = [rng.randint(1, 6) for _ in range(m)]
        rows = np.array([[rng.randint(0, 6) for _ in range(rng.choice((1, 40, 150)))] + [0] * 5 for _ in range(6)], dtype=object)
        width = max(len(r) for r in rows)
        matrix = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):
            matrix[i, : len(row)] = row
        expected = []
        for row in matrix:
            tokens = [t for t in row.tolist() if t != 0]  # 0 is padding
            expected.append(rouge_scorer._lcs_table(pattern, tokens)[-1][-1])
        assert lcs_lengths(pattern, matrix).tolist() == expected


def test_best_match_prunes_with_the_overlap_bound_and_stays_exact():
    rng = random.Random(2)
    pool_texts = [" ".join(rng.sample(WORDS, 12)) for _ in range(3000)]
    pool = RougePool(pool_texts, first_chunk=16)
    query = pool_texts[1234].replace(pool_texts[1234].split()[3], "zebra")
    pool.compared = 0
    match = pool.best_match(query)
    assert match.index == 1234 and match.score == reference_f(query, pool_texts[1234]) == 2 * 11 / 24
    assert pool.compared < 300  # the bound leaves most of the 3,000 rows unscored
    assert rouge_tokens("Don't e-mail ME!") == ["don", "t", "e", "mail", "me"]


# ---------------------------------------------------------------------------------------------- filters and parsing


@pytest.mark.parametrize("text, reason", [
    ("Add two numbers.", "too_short"),
    ("Add these two numbers.", None),
    (" ".join(["word"] * 151), "too_long"),
    (" ".join(["word"] * 150), None),
    ("Describe the image in detail.", "blacklisted_keyword"),
    ("Describe the imagery of this poem.", None),  # whole words only
    ("Explain how to go to the station.", "blacklisted_keyword"),
    ("Plot the sales figures by month.", "blacklisted_keyword"),
    ("Write a program that sorts a list.", "write_a_program"),
    ("Write a poem that sorts a list.", None),
    ('"Quote" this sentence back to me.', "starts_with_punctuation"),
    ("Élaborez un plan de voyage.", "starts_with_non_ascii"),
])
def test_instruction_filters(text, reason):
    result = sip.instruction_filter_reason(text)
    assert (result[0] if result else None) == reason


def test_instance_filters_drop_degenerate_and_duplicate_instances():
    kept, drops = sip.filter_instances([
        {"input": "a", "output": "b"},
        {"input": "a", "output": " b "},  # duplicate after stripping
        {"input": "c", "output": ""},
        {"input": "d", "output": "2."},  # a bare list marker
        {"input": "same", "output": "same"},
        {"input": "Name three colours:", "output": "red"},
        {"input": "", "output": "The task."},
        {"input": "", "output": "fine"},
        {"input": "", "output": "\n".join(f"{i}. Aulos" for i in range(1, 9))},  # a loop: 8 lines, 1 distinct
        {"input": "x", "output": "the answer is that " * 4},  # a loop: 16 words, 4 distinct 4-grams of 13
        {"input": "", "output": "1. Red\n2. Green\n3. Blue\n4. Red apples"},  # 4 lines, 4 distinct: fine
    ], instruction="The task.")
    assert kept == [{"input": "a", "output": "b"}, {"input": "", "output": "fine"}, {"input": "", "output": "1. Red\n2. Green\n3. Blue\n4. Red apples"}]
    assert drops == Counter(duplicate_instance=1, empty_output=2, output_equals_input=1, ends_with_colon=1, output_equals_instruction=1,
                            repetitive=2)
    kept, drops = sip.filter_instances([{"input": "x", "output": "1"}, {"input": "x", "output": "2"}, {"input": "y", "output": "3"}], "T")
    assert kept == [] and drops == Counter(conflicting_outputs=3)


def test_parse_instructions_completion_and_chat():
    text = " Name a fruit.\n10. List two rivers in Asia.\n11.  11. Repeat twice.\n12. Cut off mid"
    assert sip.parse_instructions(Completion(text, finished=False), limit=8) == ["Name a fruit.", "List two rivers in Asia.", "Repeat twice."]
    assert sip.parse_instructions(Completion(text, finished=True), limit=2) == ["Name a fruit.", "List two rivers in Asia."]
    chat = "Sure! Here are more:\n9. Name a fruit.\n10) Spell a word backwards."
    assert sip.parse_instructions(Completion(chat, True), 8, chat=True) == ["Name a fruit.", "Spell a word backwards."]
    assert sip.parse_instructions(Completion("One task.\nAnother task.", True), 8, chat=True) == ["One task.", "Another task."]


def test_parse_instances_input_first_and_output_first():
    text = "Input: 2 + 2\nOutput: 4\n\nExample 2\nOutput: no input here\nExample 3\nInput: lonely\nExample 4\nInput: 1\nOutput: 2\nOutput: 3"
    instances, problems = sip.parse_instances(Completion(text, True), is_classification=False, chat=False)
    assert instances == [{"input": "2 + 2", "output": "4"}, {"input": "", "output": "no input here"},
                         {"input": "1", "output": "2"}, {"input": "", "output": "3"}]
    assert problems == Counter(input_without_output=1)
    instances, problems = sip.parse_instances(Completion("Input: a\nOutput: b\nExample 2\nInput: c\nOutput: d d d", False), False, False)
    assert instances == [{"input": "a", "output": "b"}] and problems == Counter(cut_at_token_limit=1)
    text = " Positive\nInput: I love it.\nClass label: Negative\nInput: Awful.\nClass label: Neutral"
    instances, _ = sip.parse_instances(Completion(text, True), is_classification=True, chat=False)
    assert instances == [{"input": "I love it.", "output": "Positive"}, {"input": "Awful.", "output": "Negative"},
                         {"input": "", "output": "Neutral"}]
    assert [sip.parse_classification(a) for a in (" Yes", "no.", "Maybe")] == [True, False, None]
    assert cut_at_stop("abc\nTask: x", ("Task:", "\nTask:")) == ("abc", True)


# ---------------------------------------------------------------------------------------------- seeds


def test_seed_sets_load(shared_data):
    real = sip.load_seed_tasks(str(shared_data / "self_instruct" / "seed_tasks.jsonl"))
    rows = [json.loads(line) for line in (shared_data / "self_instruct" / "seed_tasks.jsonl").read_text().splitlines()]
    assert len(real) == 175 and sum(t.is_classification for t in real) == sum(r["is_classification"] for r in rows)
    own = sip.load_seed_tasks(si.BUILTIN_SEED_TASKS)
    assert len(own) >= 20 and 5 <= sum(t.is_classification for t in own) < len(own)
    assert all(sip.instruction_filter_reason(t.instruction) is None for t in own)
    pool = RougePool()
    for task in own:  # our own seeds would pass the similarity filter against each other
        assert pool.best_match(task.instruction).score < 0.7
        pool.add(task.instruction)


def test_bad_seed_file_names_line_and_field(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"instruction": "Fine task here.", "instances": [{"input": "", "output": "x"}], "is_classification": false}\n'
                    '{"instruction": "Second task here.", "instances": [{"input": "", "output": 3}], "is_classification": false}\n')
    with pytest.raises(DataError, match=r"seeds.jsonl:2: field 'instances\[0\].output'"):
        sip.load_seed_tasks(str(path))


# ---------------------------------------------------------------------------------------------- the loop, fake generator


def instruction_of(prompt: str) -> str:
    return re.findall(r"Task: (.*)\n", prompt)[-1]


class FakeGenerator:
    """Deterministic: instruction completions from a script (or fresh random-word tasks), labels from a dict,
    instances derived from the instruction. Records every call; `fail_on_call=k` raises on the k-th call."""

    chat = False

    def __init__(self, scripted=(), labels=None, instances=None, fail_on_call=None, rng_seed=0, per_prompt=3):
        self.scripted, self.labels, self.instances = list(scripted), labels or {}, instances or {}
        self.fail_on_call, self.calls = fail_on_call, []
        self.rng, self.per_prompt = random.Random(rng_seed), per_prompt

    def fresh(self) -> str:
        return " " + "\n".join(f"{9 + i}. Describe {' '.join(self.rng.sample(WORDS, 6))}." for i in range(self.per_prompt)) + "\n"

    def complete(self, prompts, max_tokens, temperature, top_p=1.0, stop=(), seed=None):
        kind = ("instructions" if prompts and prompts[0].startswith(sip.INSTRUCTION_HEADER) else
                "classify" if prompts and prompts[0].startswith(sip.CLASSIFY_HEADER) else "instances")
        self.calls.append((kind, list(prompts)))
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("killed midway")
        if kind == "instructions":
            return [Completion(self.scripted.pop(0) if self.scripted else self.fresh(), True) for _ in prompts]
        if kind == "classify":
            return [Completion(" " + self.labels.get(instruction_of(p), "No"), True) for p in prompts]
        out = []
        for prompt in prompts:
            task = instruction_of(prompt)
            default = " Yes\nInput: a case of it\nClass label: No\nInput: another case" if prompt.endswith("Class label:") else \
                f"Input: input for {task}\nOutput: output for {task}\n"
            out.append(Completion(self.instances.get(task, default), True))
        return out


def config(tmp_path, **overrides) -> si.SelfInstructConfig:
    base = dict(output_dir=str(tmp_path / "out"), num_instructions=6, prompts_per_round=1, progress=False, seed=3)
    return si.SelfInstructConfig(**(base | overrides))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_round_filter_decisions_on_crafted_candidates(tmp_path):
    seeds = sip.load_seed_tasks(si.BUILTIN_SEED_TASKS)
    crafted = [
        "Name three rivers that flow through more than one country.",  # accepted
        "List rivers.",  # too short
        "Describe the picture of a sunset over the sea.",  # blacklisted keyword
        seeds[4].instruction,  # a seed: ROUGE-L 1.0 against the pool
        "Name three rivers that flow through more than two countries.",  # like the first one, same round
        "Write a program that prints the first ten primes.",
        "Summarize the story of a famous opera in two sentences.",  # its instances are degenerate
        "Give one synonym for a common everyday adjective.",  # its instances conflict
        "Tell whether a sentence expresses happiness, sadness or anger.",  # classification: output-first
    ]
    script = [" " + "\n".join(f"{9 + i}. {text}" for i, text in enumerate(crafted)) + "\n"]
    fake = FakeGenerator(script, labels={crafted[8]: "Yes"}, instances={
        crafted[6]: "Input: \nOutput: \nExample 2\nInput: same\nOutput: same",
        crafted[7]: "Input: happy\nOutput: glad\nExample 2\nInput: happy\nOutput: joyful",
        crafted[8]: " Happiness\nInput: We won the final!\nClass label: Sadness\nInput: My dog is gone.",
    })
    cfg = config(tmp_path, num_instructions=5, max_new_per_prompt=10)
    pool = RougePool([t.instruction for t in seeds])
    accepted, rejected = si.run_round(1, seeds, [], pool, fake, cfg, first_id=0, room=5)

    reasons = {row["instruction"]: row["reason"] for row in rejected}
    assert reasons == {crafted[1]: "too_short", crafted[2]: "blacklisted_keyword", crafted[3]: "too_similar",
                       crafted[4]: "too_similar", crafted[5]: "write_a_program", crafted[6]: "no_valid_instances",
                       crafted[7]: "conflicting_instances"}
    by_text = {row["instruction"]: row for row in rejected}
    assert by_text[crafted[3]]["max_similarity"] == 1.0 and by_text[crafted[3]]["most_similar"] == seeds[4].instruction
    assert by_text[crafted[4]]["max_similarity"] == reference_f(crafted[4], crafted[0])
    assert by_text[crafted[4]]["most_similar"] == crafted[0] + " (same round)"
    assert [row["instruction"] for row in accepted] == [crafted[0], crafted[8]]
    assert [row["id"] for row in accepted] == ["si-000000", "si-000001"]
    assert accepted[1]["is_classification"] and accepted[1]["instances"] == [
        {"input": "We won the final!", "output": "Happiness"}, {"input": "My dog is gone.", "output": "Sadness"}]
    # every candidate that reached the similarity check carries its exact max against the seeds (and this round)
    assert accepted[0]["max_similarity"] == max(reference_f(crafted[0], t.instruction) for t in seeds)

    kinds = [kind for kind, _ in fake.calls]
    assert kinds == ["instructions", "classify", "instances"]
    classify_prompts, instance_prompts = fake.calls[1][1], fake.calls[2][1]
    assert [instruction_of(p) for p in classify_prompts] == [crafted[i] for i in (0, 6, 7, 8)]  # passed every instruction filter
    assert "Is it classification? Yes" in classify_prompts[0] and "Is it classification? No" in classify_prompts[0]
    outputs_first = {instruction_of(p): p.endswith("\nClass label:") for p in instance_prompts}
    assert outputs_first == {crafted[0]: False, crafted[6]: False, crafted[7]: False, crafted[8]: True}
    assert instance_prompts[3].startswith(sip.OUTPUT_FIRST_HEADER)
    assert instance_prompts[0].startswith(sip.INPUT_FIRST_HEADER) and instance_prompts[0].endswith("\nExample 1\n")


def prompt_items(prompt: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", prompt, flags=re.M)


def test_in_context_instructions_are_six_seeds_and_two_generated_once_available(tmp_path):
    seeds = [t.instruction for t in sip.load_seed_tasks(si.BUILTIN_SEED_TASKS)]
    # round 1 accepts one instruction (its second prompt yields nothing), later prompts three each
    fake = FakeGenerator([" Describe " + " ".join(random.Random(9).sample(WORDS, 6)) + ".\n", ""], rng_seed=4)
    report = si.run_self_instruct(config(tmp_path, num_instructions=10, prompts_per_round=2), fake)
    accepted = read(tmp_path / "out" / si.ACCEPTED)
    assert [r["round"] for r in accepted] == [1] + [2] * 6 + [3] * 3
    generated_before = {}
    for row in accepted:
        generated_before.setdefault(row["round"], set()).add(row["instruction"])
    prompts = [p for kind, batch in fake.calls if kind == "instructions" for p in batch]
    assert len(prompts) == 2 * report["rounds"]
    machine_so_far: set[str] = set()
    seen_counts = []
    for round_index in range(1, report["rounds"] + 1):
        for prompt in prompts[2 * (round_index - 1): 2 * round_index]:
            items = prompt_items(prompt)
            assert len(items) == 8 and prompt.endswith("\n9.")
            from_machine = [x for x in items if x in machine_so_far]
            assert len(from_machine) == min(2, len(machine_so_far))
            seen_counts.append(len(from_machine))
            assert all(x in seeds for x in items if x not in machine_so_far) and len(set(items)) == 8
        machine_so_far |= generated_before.get(round_index, set())
    assert seen_counts == [0, 0, 1, 1, 2, 2]  # 8 seeds; then 7 + the one generated; then 6 + 2


def test_accepted_instructions_join_the_pool_for_the_next_round(tmp_path):
    first = "Describe the customs of a small mountain village in winter."
    near = "Describe the customs of a small fishing village in winter."
    fake = FakeGenerator([f" {first}\n", f" {near}\n"])
    si.run_self_instruct(config(tmp_path, num_instructions=2), fake)
    rejected = read(tmp_path / "out" / si.REJECTED)
    assert [(r["instruction"], r["reason"], r["most_similar"]) for r in rejected if r["round"] == 2] == [(near, "too_similar", first)]
    assert rejected[0]["max_similarity"] == reference_f(near, first)
    accepted = read(tmp_path / "out" / si.ACCEPTED)
    assert [r["instruction"] for r in accepted][0] == first and len(accepted) == 2


def test_classification_tasks_get_output_first_instances(tmp_path):
    task = "Decide whether a movie review is positive or negative."
    fake = FakeGenerator([f" {task}\n"], labels={task: "Yes"}, instances={task: " Positive\nInput: Loved every minute.\nClass label: Negative\nInput: Two hours lost."})
    si.run_self_instruct(config(tmp_path, num_instructions=1), fake)
    row = read(tmp_path / "out" / si.ACCEPTED)[0]
    assert row["is_classification"] and row["instances"] == [{"input": "Loved every minute.", "output": "Positive"},
                                                               {"input": "Two hours lost.", "output": "Negative"}]
    instance_prompt = fake.calls[2][1][0]
    assert instance_prompt.startswith(sip.OUTPUT_FIRST_HEADER) and instance_prompt.endswith(f"Task: {task}\nClass label:")
    shots = re.findall(r"Task: (.*)\n", instance_prompt)[:-1]
    classification_seeds = {t.instruction for t in sip.load_seed_tasks(si.BUILTIN_SEED_TASKS) if t.is_classification}
    assert shots and set(shots) <= classification_seeds  # few-shot examples of the same kind


def test_resume_after_an_interruption_keeps_every_accepted_row_once(tmp_path):
    cfg = config(tmp_path, num_instructions=8, prompts_per_round=1)
    # calls go instructions, classify, instances per round: call 8 is round 3's classification
    with pytest.raises(RuntimeError, match="killed midway"):
        si.run_self_instruct(cfg, FakeGenerator(fail_on_call=8, rng_seed=5))
    before = read(tmp_path / "out" / si.ACCEPTED)
    assert len(before) == 6 and {r["round"] for r in before} == {1, 2}
    fake = FakeGenerator(rng_seed=6)
    report = si.run_self_instruct(cfg, fake)
    after = read(tmp_path / "out" / si.ACCEPTED)
    assert after[: len(before)] == before and len(after) == 8 == report["accepted"]
    assert len({r["instruction"] for r in after}) == 8 and [r["id"] for r in after] == [f"si-{i:06d}" for i in range(8)]
    assert [r["round"] for r in after[6:]] == [3, 3]  # rounds continue, they do not restart
    # the rerun's prompts already draw on the instructions accepted before the interruption
    items = prompt_items(fake.calls[0][1][0])
    assert len([x for x in items if x in {r["instruction"] for r in before}]) == 2
    assert report["rejected_by_reason"] == {"over_target": 1}  # round 3 made 3, the target needed 2
    assert si.run_self_instruct(cfg, FakeGenerator())["accepted"] == 8  # a finished run stays finished
    assert read(tmp_path / "out" / si.ACCEPTED) == after


def test_a_line_cut_off_by_a_crash_is_dropped_and_a_corrupt_line_is_reported(tmp_path):
    path = tmp_path / "accepted.jsonl"
    path.write_text('{"round": 1, "instruction": "a"}\n{"round": 2, "instr')
    assert si.read_log(path) == [{"round": 1, "instruction": "a"}]
    si.append_log(path, [{"round": 2, "instruction": "b"}])
    assert read(path) == [{"round": 1, "instruction": "a"}, {"round": 2, "instruction": "b"}]
    path.write_text('{"round": 1, "instruction": "a"}\nnot json\n{"round": 1, "instruction": "c"}\n')
    with pytest.raises(DataError, match="accepted.jsonl:2"):
        si.read_log(path)


def test_sft_export_and_report(tmp_path):
    fake = FakeGenerator(rng_seed=7, per_prompt=4)
    fake.scripted = [" Add two numbers.\n10. " + " ".join(["Describe"] + random.Random(1).sample(WORDS, 5)) + ".\n11. Draw a map of the town.\n"]
    report = si.run_self_instruct(config(tmp_path, num_instructions=5, prompts_per_round=1), fake)
    out = tmp_path / "out"
    accepted, rejected = read(out / si.ACCEPTED), read(out / si.REJECTED)
    examples, fmt = load_sft_examples(str(out / si.SFT))
    assert fmt == "alpaca" and len(examples) == sum(len(r["instances"]) for r in accepted) == report["instances"] == 5
    first = accepted[0]
    assert examples[0]["messages"][0]["content"].startswith(first["instruction"])
    assert examples[0]["messages"][-1]["content"] == first["instances"][0]["output"]
    assert report["rejected_by_reason"] == dict(Counter(r["reason"] for r in rejected))
    assert report["rejected_by_reason"]["too_short"] == 1 and report["rejected_by_reason"]["blacklisted_keyword"] == 1
    checked = [r["max_similarity"] for r in accepted + rejected if r["max_similarity"] is not None]
    assert sum(report["similarity_histogram"].values()) == len(checked) == report["candidates"] - 2
    assert report["classification_share"] == 0.0 and json.loads((out / si.REPORT).read_text())["accepted"] == 5


def test_report_by_hand():
    accepted = [{"round": 1, "instruction": "a", "max_similarity": 0.05, "is_classification": True, "instances": [{}, {}]},
                {"round": 2, "instruction": "b", "max_similarity": 0.69, "is_classification": False, "instances": [{}],
                 "instance_drops": {"empty_output": 2}, "classification_answer": "No"}]
    rejected = [{"round": 2, "instruction": "c", "max_similarity": 1.0, "reason": "too_similar"},
                {"round": 2, "instruction": "d", "max_similarity": None, "reason": "too_short"},
                {"round": 3, "instruction": "e", "max_similarity": 0.7, "reason": "too_similar", "classification_answer": "hmm"}]
    report = si.build_report(accepted, rejected, num_seeds=10)
    assert report["rounds"] == 3 and report["candidates"] == 5 and report["acceptance_rate"] == 0.4
    assert report["rejected_by_reason"] == {"too_similar": 2, "too_short": 1}
    histogram = report["similarity_histogram"]
    assert histogram["0.0-0.1"] == 1 and histogram["0.6-0.7"] == 1 and histogram["0.7-0.8"] == 1 and histogram["0.9-1.0"] == 1
    assert sum(histogram.values()) == 4 and report["classification_share"] == 0.5 and report["instances"] == 3
    assert report["instance_drops"] == {"empty_output": 2} and report["unclear_classification_answers"] == 1


# ---------------------------------------------------------------------------------------------- HTTP backend


class FakeServer:
    """A small OpenAI-compatible app (FastAPI + uvicorn on 127.0.0.1, in a background thread).

    Prompts steer it: FAIL_ONCE answers 500 the first time, SLOW_ONCE sleeps past the client timeout the first
    time, ALWAYS_SLOW always does, LONG ends on the token limit; anything else waits 0.1 s and echoes. It counts
    attempts per prompt and the most requests in flight at once. `answer` (prompt -> text) can be replaced.
    """

    def __init__(self):
        self.attempts, self.in_flight, self.max_in_flight, self.bodies = Counter(), 0, 0, []
        self.answer = lambda prompt: f"echo: {prompt}"
        app = FastAPI()

        async def handle(request: Request, chat: bool):
            if request.headers.get("authorization") == "Bearer wrong":
                return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
            body = await request.json()
            self.bodies.append(body)
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            self.attempts[prompt] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                first = self.attempts[prompt] == 1
                if "FAIL_ONCE" in prompt and first:
                    return JSONResponse({"error": "boom"}, status_code=500)
                await asyncio.sleep(1.0 if "ALWAYS_SLOW" in prompt or ("SLOW_ONCE" in prompt and first) else 0.1)
                text, reason = self.answer(prompt), "length" if "LONG" in prompt else "stop"
                choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
                return {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice | {"finish_reason": reason}]}
            finally:
                self.in_flight -= 1

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await handle(request, True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, False)

        self.app = app


@pytest.fixture
def fake_server():
    import uvicorn

    server_state = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(server_state.app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    server_state.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    yield server_state
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_http_backend_honors_the_concurrency_limit_and_keeps_order(fake_server):
    generator = OpenAIGenerator(fake_server.url, "fake-model", api_key="k", max_concurrency=3, backoff=0.01)
    prompts = [f"prompt {i}" for i in range(12)]
    completions = generator.complete(prompts, max_tokens=5, temperature=0.0, stop=("XYZ",), seed=10)
    assert [c.text for c in completions] == [f"echo: prompt {i}" for i in range(12)] and all(c.finished for c in completions)
    assert fake_server.max_in_flight == 3  # 12 requests of 0.1 s each fill every slot, and never more
    body = fake_server.bodies[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 5 and body["stop"] == ["XYZ"]
    assert sorted(b["seed"] for b in fake_server.bodies) == list(range(10, 22))


def test_http_backend_retries_after_a_500_and_after_a_timeout(fake_server):
    generator = OpenAIGenerator(fake_server.url, "m", mode="completions", timeout=0.4, max_retries=2, backoff=0.01)
    completions = generator.complete(["FAIL_ONCE a", "SLOW_ONCE b", "fine c"], max_tokens=5, temperature=0.0)
    assert [c.text for c in completions] == ["echo: FAIL_ONCE a", "echo: SLOW_ONCE b", "echo: fine c"]
    assert fake_server.attempts == Counter({"FAIL_ONCE a": 2, "SLOW_ONCE b": 2, "fine c": 1})
    assert generator.stats["retries"] == 2 and generator.stats["server_errors"] == 1 and generator.stats["timeouts"] == 1
    with pytest.raises(RequestFailed, match="gave up after 3 attempts; last: no answer within"):
        generator.complete(["ALWAYS_SLOW"], max_tokens=5, temperature=0.0)
    assert fake_server.attempts["ALWAYS_SLOW"] == 3


def test_http_backend_fails_fast_on_a_client_error_and_cuts_at_stop_strings(fake_server):
    with pytest.raises(RequestFailed, match="HTTP 401.*--api_key"):
        OpenAIGenerator(fake_server.url, "m", api_key="wrong", backoff=0.01).complete(["hi"], 5, 0.0)
    fake_server.answer = lambda prompt: "first part\nTask: the next one"
    completion = OpenAIGenerator(fake_server.url, "m").complete(["LONG"], 5, 0.0, stop=("\nTask:",))[0]
    assert completion == Completion("first part", True)  # cut here: a stop string found means it ended
    fake_server.answer = lambda prompt: "cut by the limit"
    assert OpenAIGenerator(fake_server.url, "m").complete(["LONG"], 5, 0.0)[0] == Completion("cut by the limit", False)
    with pytest.raises(ValueError, match="--api_base must be an http"):
        OpenAIGenerator("localhost:8000", "m")


def test_cli_runs_the_loop_against_an_openai_compatible_server(fake_server, tmp_path):
    fake = FakeGenerator(rng_seed=11)
    fake_server.answer = lambda prompt: fake.complete([prompt], 100, 0.0)[0].text
    runner = CliRunner()
    args = ["--output_dir", str(tmp_path / "out"), "--num_instructions", "4", "--api_base", fake_server.url,
            "--model", "fake", "--api_mode", "completions", "--prompts_per_round", "2", "--no_progress"]
    result = runner.invoke(si.app, args)
    assert result.exit_code == 0, result.output
    assert "accepted 4 of" in result.output and "max ROUGE-L against the pool" in result.output
    accepted = read(tmp_path / "out" / si.ACCEPTED)
    assert len(accepted) == 4 and len(read(tmp_path / "out" / si.SFT)) == 4
    assert all(b["model"] == "fake" for b in fake_server.bodies)

    group = typer.Typer()  # registered the way alignkit's `data` group does it
    group.command("self-instruct")(si.self_instruct_command)
    group.command("other")(lambda: None)
    result = runner.invoke(group, ["self-instruct", "--help"])
    assert result.exit_code == 0 and "--num_instructions" in result.output and "OPENAI_API_KEY" in result.output

    result = runner.invoke(si.app, ["--output_dir", str(tmp_path / "x"), "--num_instructions", "2"])
    assert result.exit_code == 2 and "error: pass either --model_name_or_path" in result.output
    result = runner.invoke(si.app, ["--output_dir", str(tmp_path / "x"), "--seed_tasks", str(tmp_path / "none.jsonl"),
                                    "--api_base", fake_server.url, "--model", "m"])
    assert result.exit_code == 2 and "error: --seed_tasks" in result.output and "none.jsonl does not exist" in result.output


# ---------------------------------------------------------------------------------------------- built-in model


REASONS = {"too_short", "too_long", "blacklisted_keyword", "write_a_program", "starts_with_punctuation", "starts_with_non_ascii",
           "too_similar", "no_valid_instances", "conflicting_instances", "over_target"}


def test_short_run_with_the_builtin_model(tmp_path):
    """The built-in model writes at least one candidate instruction in one round. Measured over 10 seeds (0–9,
    `tests/learning.py self_instruct`; one thread, the shared 2-core AMD EPYC, 2026-12-01): candidates min 2,
    median 3, max 3; accepted 1 for nine seeds, 0 for seed 9 (so no accepted count is asserted). Bound: ≥ 1."""
    # one round, one prompt, short completions: 14 s on a quiet 2-core CPU, 70-90 s when the machine is shared
    report = self_instruct_short_run(tmp_path, seed=0)
    out = tmp_path / "out"
    accepted, rejected = read(out / si.ACCEPTED), read(out / si.REJECTED)
    assert report["candidates"] == len(accepted) + len(rejected) >= 1  # seed 0: the model does write a list
    seeds = [t.instruction for t in sip.load_seed_tasks(si.BUILTIN_SEED_TASKS)]
    for i, row in enumerate(accepted):
        assert sip.instruction_filter_reason(row["instruction"]) is None
        earlier = seeds + [r["instruction"] for r in accepted[:i]]
        assert max(reference_f(row["instruction"], text) for text in earlier) < 0.7
        assert row["instances"] and sip.filter_instances(row["instances"], row["instruction"]) == (row["instances"], Counter())
    assert all(row["reason"] in REASONS for row in rejected)
    assert all(row["max_similarity"] >= 0.7 for row in rejected if row["reason"] == "too_similar")
    assert len(read(out / si.SFT)) == sum(len(r["instances"]) for r in accepted)
    assert json.loads((out / si.REPORT).read_text())["candidates"] == report["candidates"]
