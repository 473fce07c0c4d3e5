"""Self-Instruct's text side: seed tasks, the prompts a model continues, parsing its completions, and the filters
that accept or reject what it wrote. Pure functions of strings (no model); `self_instruct.py` runs the rounds.
The steps they implement are listed in `self_instruct.py`'s docstring."""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from alignkit.data.formats import DataError, read_rows
from alignkit.data.generators import Completion

BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")


@dataclass
class SeedTask:
    instruction: str
    instances: list[dict]
    is_classification: bool


# ---------------------------------------------------------------------------------------------- seed tasks


def load_seed_tasks(path: str) -> list[SeedTask]:
    """Self-Instruct's JSONL: {"instruction", "instances": [{"input", "output"}], "is_classification"} per line."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--seed_tasks {path} does not exist")
    tasks = []
    for row in read_rows(path):
        data, where = row.data, row.where
        instruction = data.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(where, "must be a non-empty string (the task's instruction)", "instruction")
        instances = data.get("instances")
        if not isinstance(instances, list) or not instances:
            raise DataError(where, 'must be a non-empty list of {"input": str, "output": str}', "instances")
        for i, instance in enumerate(instances):
            for key in ("input", "output"):
                if not isinstance(instance, dict) or not isinstance(instance.get(key), str):
                    raise DataError(where, "must be a string ('' for no input)", f"instances[{i}].{key}")
        label = data.get("is_classification")
        if not isinstance(label, bool):
            raise DataError(where, "must be true or false", "is_classification")
        tasks.append(SeedTask(" ".join(instruction.split()), instances, label))
    return tasks


# ---------------------------------------------------------------------------------------------- prompts


INSTRUCTION_HEADER = "Come up with a series of tasks:\n"
CLASSIFY_HEADER = "Can the following task be regarded as a classification task with finite output labels?\n\n"
INPUT_FIRST_HEADER = ("Write examples for the following tasks. Give several examples when you can. "
                      "If a task needs no input, write only the output.\n\n")
OUTPUT_FIRST_HEADER = ("Each task below is a classification task. For each possible class label, write the label, "
                       "then an input that belongs to that class. If a task needs no input, write only the label.\n\n")


def instruction_prompt(instructions: list[str]) -> str:
    """A numbered list of the in-context instructions that ends on the next number, for the model to continue."""
    lines = "".join(f"{i}. {text}\n" for i, text in enumerate(instructions, start=1))
    return f"{INSTRUCTION_HEADER}{lines}{len(instructions) + 1}."


def sample_prompt_instructions(rng: random.Random, seeds: list[str], machine: list[str], num_prompt: int, num_machine: int) -> list[str]:
    """`num_prompt` in-context instructions in random order: up to `num_machine` generated ones, seeds for the rest."""
    from_machine = rng.sample(machine, min(num_machine, len(machine)))
    from_seeds = rng.sample(seeds, min(num_prompt - len(from_machine), len(seeds)))
    chosen = from_machine + from_seeds
    rng.shuffle(chosen)
    return chosen


def parse_instructions(completion: Completion, limit: int, chat: bool = False) -> list[str]:
    """The items of a continued numbered list, at most `limit`.

    Completion mode: the prompt ended on 'N.', so the text starts inside item N. Chat mode: the answer
    restates numbers, and text before the first one is a preamble ("Sure, here are ..."); an answer
    without numbers gives one item per line. An unfinished completion (cut at the token limit) loses
    its last item, which may be cut mid-sentence.
    """
    items = re.split(r"(?:^|\n)[ \t]*\d{1,3}[ \t]*[.)]", completion.text)
    if chat:
        items = items[1:] if len(items) > 1 else completion.text.splitlines()
    if not completion.finished:
        items = items[:-1]
    cleaned = [" ".join(re.sub(r"^(\s*\d{1,3}\s*[.)])+", "", item).split()) for item in items]
    return [item for item in cleaned if item][:limit]


def classification_prompt(instruction: str, shots: list[SeedTask]) -> str:
    examples = "".join(f"Task: {t.instruction}\nIs it classification? {'Yes' if t.is_classification else 'No'}\n\n" for t in shots)
    return f"{CLASSIFY_HEADER}{examples}Task: {instruction}\nIs it classification?"


def classification_shots(seeds: list[SeedTask], per_label: int) -> list[SeedTask]:
    """The first `per_label` seeds of each label, alternating yes/no so the order does not suggest an answer."""
    yes = [t for t in seeds if t.is_classification][:per_label]
    no = [t for t in seeds if not t.is_classification][:per_label]
    return [t for pair in zip(yes, no) for t in pair] + yes[len(no):] + no[len(yes):]


def parse_classification(text: str) -> bool | None:
    word = re.match(r"\W*(\w+)", text)
    answer = word.group(1).lower() if word else ""
    return True if answer == "yes" else False if answer == "no" else None


def _example_block(task: SeedTask, output_first: bool) -> str:
    if output_first:
        parts = [f"Class label: {x['output']}\n" + (f"Input: {x['input']}\n" if x["input"].strip() else "") for x in task.instances]
        return f"Task: {task.instruction}\n" + "".join(parts)
    parts = [f"Example {i}\n" + (f"Input: {x['input']}\n" if x["input"].strip() else "") + f"Output: {x['output']}\n"
             for i, x in enumerate(task.instances, start=1)]
    return f"Task: {task.instruction}\n" + "".join(parts)


def instance_prompt(instruction: str, is_classification: bool, shots: list[SeedTask]) -> str:
    header = OUTPUT_FIRST_HEADER if is_classification else INPUT_FIRST_HEADER
    examples = "".join(_example_block(t, is_classification) + "\n" for t in shots)
    opening = "Class label:" if is_classification else "Example 1\n"
    return f"{header}{examples}Task: {instruction}\n{opening}"


def instance_shots(rng: random.Random, seeds: list[SeedTask], is_classification: bool, k: int, max_chars: int = 600) -> list[SeedTask]:
    """k seeds of the same kind whose examples are short (a 135M model has little room for long ones)."""
    same = [t for t in seeds if t.is_classification == is_classification] or seeds
    short = [t for t in same if len(_example_block(t, is_classification)) <= max_chars] or sorted(
        same, key=lambda t: len(_example_block(t, is_classification)))[:k]
    return rng.sample(short, min(k, len(short)))


_MARKER = re.compile(r"(?:^|\n)[ \t]*(?:(Example[ \t]*\d+)[ \t]*:?|(Input|Output|Class label)[ \t]*:)")


def _segments(text: str) -> list[tuple[str, str]]:
    """(marker, text up to the next marker) pairs; markers are 'Example', 'Input', 'Output', 'Class label'."""
    found = list(_MARKER.finditer(text))
    return [("Example" if m.group(1) else m.group(2), text[m.end(): found[i + 1].start() if i + 1 < len(found) else len(text)])
            for i, m in enumerate(found)]


def parse_instances(completion: Completion, is_classification: bool, chat: bool) -> tuple[list[dict], Counter]:
    """Instances, and counts of what could not be used. Completion mode continues the prompt's opening line.

    Input-first: each 'Output:' pairs with the 'Input:' right before it in the same example ('' if none).
    Output-first: each 'Class label:' starts an instance whose 'Input:' may follow. An unfinished completion
    (cut at the token limit) loses its last instance: its text stops mid-way.
    """
    text = completion.text if chat else ("Class label:" if is_classification else "Example 1\n") + completion.text
    instances, problems, pending_input = [], Counter(), None
    for marker, body in _segments(text):
        body = body.strip()
        if is_classification:
            if marker == "Class label":
                instances.append({"input": "", "output": body})
            elif marker == "Input" and instances and not instances[-1]["input"]:
                instances[-1]["input"] = body
            continue
        if marker == "Output":
            instances.append({"input": pending_input or "", "output": body})
            pending_input = None
        else:  # a new example or an input: an input still waiting for its output is lost
            problems["input_without_output"] += pending_input is not None
            pending_input = body if marker == "Input" else None
    problems["input_without_output"] += pending_input is not None
    if instances and not completion.finished:
        instances.pop()
        problems["cut_at_token_limit"] += 1
    return instances, +problems


def is_repetitive(text: str) -> bool:
    """A degenerate loop: over half of ≥ 4 lines repeat (list numbers ignored), or over half of ≥ 10 word 4-grams do."""
    lines = [re.sub(r"^[\s\-*\d.)]+", "", line).strip().lower() for line in text.splitlines() if line.strip()]
    if len(lines) >= 4 and len(set(lines)) < len(lines) / 2:
        return True
    words = text.lower().split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return len(grams) >= 10 and len(set(grams)) < len(grams) / 2


# ---------------------------------------------------------------------------------------------- filters


def instruction_filter_reason(instruction: str, blacklist: tuple[str, ...] = BLACKLIST) -> tuple[str, str] | None:
    """(reason, detail) for the first heuristic filter the instruction fails, None when it passes them all."""
    words = instruction.split()
    if len(words) <= 3:
        return "too_short", f"{len(words)} words (needs more than 3)"
    if len(words) > 150:
        return "too_long", f"{len(words)} words (at most 150)"
    lower = instruction.lower()
    for keyword in blacklist:
        if re.search(rf"\b{re.escape(keyword)}\b", lower):
            return "blacklisted_keyword", keyword  # a text-only model cannot see or make images, files, ...
    if lower.startswith("write a program"):
        return "write_a_program", "starts with 'Write a program'"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation", instruction[0]
    if not instruction[0].isascii():
        return "starts_with_non_ascii", instruction[0]
    return None


def filter_instances(instances: list[dict], instruction: str) -> tuple[list[dict], Counter]:
    """Valid, distinct instances, and how many were dropped per reason ('conflicting_outputs' drops them all)."""
    drops, kept, seen = Counter(), [], set()
    for instance in instances:
        source, target = instance["input"].strip(), instance["output"].strip()
        if not target or re.fullmatch(r"\d+[.)]|[-*•]", target):  # nothing, or a bare list marker
            drops["empty_output"] += 1
        elif source == target:
            drops["output_equals_input"] += 1
        elif source.endswith(":") or target.endswith(":"):
            drops["ends_with_colon"] += 1
        elif target == instruction.strip():
            drops["output_equals_instruction"] += 1
        elif is_repetitive(target) or is_repetitive(source):
            drops["repetitive"] += 1
        elif (source, target) in seen:
            drops["duplicate_instance"] += 1
        else:
            seen.add((source, target))
            kept.append({"input": source, "output": target})
    outputs_per_input = Counter(source for source, _ in seen if source)
    if any(n > 1 for n in outputs_per_input.values()):  # one input, two different answers: the task is ill-posed
        drops["conflicting_outputs"] += len(kept)
        kept = []
    return kept, drops
