"""Self-Instruct (Wang et al., 2023): grow a pool of seed tasks into an instruction data set with a language model.

One round:
1. Instruction generation. Each of `prompts_per_round` prompts lists 8 instructions as a numbered list, 6 drawn
   from the seed tasks and 2 from the instructions generated so far (seeds fill in until there are 2); the
   model continues the list with new tasks.
2. Instruction filters, first failing reason wins: too short (≤ 3 words) or too long (> 150 words), a
   blacklisted keyword (image, graph, file, map, draw, plot, go to, ... as whole words), "Write a program ...",
   starting with punctuation or a non-ASCII character, and ROUGE-L F ≥ `similarity_threshold` (0.7) against
   every instruction in the pool (seeds + accepted) or an earlier candidate of the same round.
3. Classification identification: a few-shot yes/no prompt built from the seed tasks' labels.
4. Instance generation: output-first for classification tasks (a class label, then an input of that class, so
   the labels are not all the same), input-first otherwise (an input, then its output).
5. Instance filters: drop an instance cut at the token limit, empty outputs, output = input, input or output
   ending in ':' (cut-off text), output = the instruction, repetitive loops, duplicates; drop all instances when
   one input gets different outputs. An instruction left
   without instances is rejected; the rest are accepted and join the pool at once (the next round sees them).
Rounds repeat until `num_instructions` are accepted.

Output directory: `accepted.jsonl` (instruction, instances, is_classification, max_similarity, ...),
`rejected.jsonl` (every rejected candidate with its reason), both append-only, one round at a time: a rerun
reads them back and continues with the next round, so accepted rows are never lost or duplicated.
`sft.jsonl` (Alpaca rows: instruction, input, output, one per instance) and `report.json` (counts per reason,
the histogram of each candidate's max ROUGE-L against the pool, the classification share) are rewritten at
the end of each run.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from alignkit import atomic
from alignkit.config import knob
from alignkit.data.formats import DataError, read_rows
from alignkit.data.generators import Completion, Generator, LocalGenerator, OpenAIGenerator
from alignkit.flags import APP_SETTINGS, command_from

if TYPE_CHECKING:
    from alignkit.data.similarity import RougePool  # imported where used: rouge_score pulls in nltk (~1 s)

BUILTIN_SEED_TASKS = str(Path(__file__).with_name("seed_tasks.jsonl"))
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
ACCEPTED, REJECTED, SFT, REPORT = "accepted.jsonl", "rejected.jsonl", "sft.jsonl", "report.json"


@dataclass
class SelfInstructConfig:
    """Self-Instruct: grow seed tasks into instructions with instances using a model; filter; export SFT JSONL."""

    seed_tasks: str = knob(BUILTIN_SEED_TASKS, "Self-Instruct JSONL seed tasks (default: alignkit's own 26)")
    output_dir: str = knob("outputs/self_instruct", "accepted.jsonl, rejected.jsonl, sft.jsonl, report.json; a rerun continues",
                           required=True, path="output_dir")
    num_instructions: int = knob(100, "accepted instructions to reach (counting earlier runs)", min=1)
    model_name_or_path: Optional[str] = knob(None, "a local model (e.g. smollm2-135m-instruct) ...")
    api_base: Optional[str] = knob(None, "... or an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    model: Optional[str] = knob(None, "model name to ask the server for")
    api_key: Optional[str] = knob(None, "bearer token (default: $OPENAI_API_KEY)")
    api_mode: str = knob("chat", "chat (/chat/completions) | completions (/completions)", choices=("chat", "completions"))
    max_concurrency: int = knob(8, "HTTP requests in flight at once", min=1)
    max_retries: int = knob(3, "retries after a timeout, connection error, 429 or 5xx", min=0)
    request_timeout: float = knob(60.0, "seconds per HTTP attempt", min=0, min_exclusive=True)
    batch_size: int = knob(8, "local model: prompts per batch", min=1, aliases=("--per_device_eval_batch_size",))
    use_chat_template: str = knob("no", "local model: no (continue the prompt as text) | yes | auto", choices=("no", "yes", "auto"))
    prompts_per_round: int = knob(8, "instruction-generation prompts per round", min=1)
    num_prompt_instructions: int = knob(8, "in-context instructions per prompt", min=1)
    num_machine_instructions: int = knob(2, "of those, from the generated pool", min=0)
    max_new_per_prompt: int = knob(8, "new tasks kept from one instruction-generation completion", min=1)
    similarity_threshold: float = knob(0.7, "reject at ROUGE-L F >= this", min=0, max=1, min_exclusive=True)
    temperature: float = knob(0.7, "instruction generation (classification and instances are greedy)", min=0)
    top_p: float = knob(0.5, "instruction generation", min=0, max=1, min_exclusive=True)
    max_instruction_tokens: int = knob(256, "token limit of an instruction-generation completion", min=1)
    max_instance_tokens: int = knob(300, "token limit of an instance-generation completion", min=1)
    classification_shots: int = knob(4, "examples of each label in the classification prompt", min=0)
    instance_shots: int = knob(2, "worked examples in the instance-generation prompt", min=0)
    max_stalled_rounds: int = knob(10, "give up after this many rounds accept nothing", min=1)
    seed: int = knob(0, "random seed", min=0)
    progress: bool = knob(True, "show a progress bar")

    def validate(self) -> None:
        check_config(self)


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


def sample_prompt_instructions(rng: random.Random, seeds: list[str], machine: list[str], cfg: SelfInstructConfig) -> list[str]:
    from_machine = rng.sample(machine, min(cfg.num_machine_instructions, len(machine)))
    from_seeds = rng.sample(seeds, min(cfg.num_prompt_instructions - len(from_machine), len(seeds)))
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


# ---------------------------------------------------------------------------------------------- one round


def run_round(round_index: int, seeds: list[SeedTask], machine: list[str], pool: RougePool, generator: Generator,
              cfg: SelfInstructConfig, first_id: int, room: int) -> tuple[list[dict], list[dict]]:
    """Generate, filter and complete one round of candidates; returns (accepted rows, rejected rows)."""
    rng = random.Random(cfg.seed * 1_000_003 + round_index)
    seed_base = cfg.seed * 1_000_003 + round_index * 10
    seed_texts = [t.instruction for t in seeds]
    in_context = [sample_prompt_instructions(rng, seed_texts, machine, cfg) for _ in range(cfg.prompts_per_round)]
    prompts = [instruction_prompt(instructions) for instructions in in_context]
    next_number = len(in_context[0]) + cfg.max_new_per_prompt + 1  # stop before the task after the last one we keep
    stop = (f"\n{next_number}.",) if generator.chat else ("\n\n", f"\n{next_number}.")
    completions = generator.complete(prompts, cfg.max_instruction_tokens, cfg.temperature, cfg.top_p, stop, seed_base)
    candidates = [text for c in completions for text in parse_instructions(c, cfg.max_new_per_prompt, generator.chat)]

    from alignkit.data.similarity import RougePool

    rejected, pending, this_round = [], [], RougePool()
    for text in candidates:
        row = {"round": round_index, "instruction": text, "max_similarity": None}
        failed = instruction_filter_reason(text)
        if failed is None:
            best, in_round = pool.best_match(text), this_round.best_match(text)
            match_text = pool.texts[best.index] if best.score > 0 else ""
            if in_round.score > best.score:
                best, match_text = in_round, this_round.texts[in_round.index] + " (same round)"
            row |= {"max_similarity": best.score, "most_similar": match_text}
            if best.score >= cfg.similarity_threshold:
                failed = ("too_similar", f"ROUGE-L {best.score:.3f} >= {cfg.similarity_threshold}")
        if failed:
            rejected.append(row | {"reason": failed[0], "detail": failed[1]})
        else:
            pending.append(row)
            this_round.add(text)

    shots = classification_shots(seeds, cfg.classification_shots)
    answers = generator.complete([classification_prompt(r["instruction"], shots) for r in pending], 3, 0.0, 1.0, ("\n",), seed_base + 1)
    for row, answer in zip(pending, answers):
        label = parse_classification(answer.text)
        row |= {"is_classification": bool(label), "classification_answer": answer.text.strip()[:20]}
    prompts = [instance_prompt(r["instruction"], r["is_classification"], instance_shots(rng, seeds, r["is_classification"], cfg.instance_shots))
               for r in pending]
    outputs = generator.complete(prompts, cfg.max_instance_tokens, 0.0, 1.0, ("\nTask:", "Task:"), seed_base + 2)

    accepted = []
    for row, output in zip(pending, outputs):
        parsed, problems = parse_instances(output, row["is_classification"], generator.chat)
        instances, drops = filter_instances(parsed, row["instruction"])
        drops.update(problems)
        row["instance_drops"] = dict(drops)
        if not instances:
            reason = "conflicting_instances" if drops["conflicting_outputs"] else "no_valid_instances"
            rejected.append(row | {"reason": reason, "detail": ", ".join(f"{k}: {n}" for k, n in drops.items()) or "none generated"})
        elif len(accepted) >= room:
            rejected.append(row | {"reason": "over_target", "detail": "--num_instructions reached earlier in this round"})
        else:
            accepted.append({"id": f"si-{first_id + len(accepted):06d}", **row, "instances": instances})
    return accepted, rejected


# ---------------------------------------------------------------------------------------------- files, loop, report


def read_log(path: Path) -> list[dict]:
    """Rows of an append-only log; a last line cut off by a crash is removed from the file (its round reruns)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, offset = [], 0
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("round"), int):
                    raise ValueError("needs an 'instruction' string and a 'round' number")
            except ValueError as error:
                if number == len(lines) and not raw.endswith(b"\n"):  # the write a crash interrupted
                    with open(path, "r+b") as handle:
                        handle.truncate(offset)
                    break
                raise DataError(f"{path}:{number}", f"is not a row this command wrote ({error}); fix or delete "
                                "the line (or the output directory, to start over)") from None
            rows.append(row)
        offset += len(line) + 1
    return rows


def append_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())


def sft_rows(accepted: list[dict]) -> list[dict]:
    return [{"instruction": row["instruction"], "input": x["input"], "output": x["output"]} for row in accepted for x in row["instances"]]


def build_report(accepted: list[dict], rejected: list[dict], num_seeds: int) -> dict:
    """Counts per reason; histogram of each candidate's max ROUGE-L F against the pool (bins of 0.1, the last
    one closed: [0.9, 1.0]); the share of accepted instructions identified as classification tasks."""
    similarities = [row["max_similarity"] for row in accepted + rejected if row.get("max_similarity") is not None]
    histogram = Counter(min(int(s * 10), 9) for s in similarities)
    drops = Counter()
    for row in accepted + rejected:
        drops.update(row.get("instance_drops", {}))
    candidates = len(accepted) + len(rejected)
    return {
        "seed_tasks": num_seeds,
        "rounds": max((row["round"] for row in accepted + rejected), default=0),
        "candidates": candidates,
        "accepted": len(accepted),
        "acceptance_rate": round(len(accepted) / candidates, 4) if candidates else 0.0,
        "rejected_by_reason": dict(Counter(row["reason"] for row in rejected).most_common()),
        "similarity_histogram": {f"{b / 10:.1f}-{(b + 1) / 10:.1f}": histogram[b] for b in range(10)},
        "classification_share": round(sum(r["is_classification"] for r in accepted) / len(accepted), 4) if accepted else 0.0,
        "instances": sum(len(r["instances"]) for r in accepted),
        "instance_drops": dict(drops.most_common()),
        "unclear_classification_answers": sum(
            parse_classification(r["classification_answer"]) is None for r in accepted + rejected if "classification_answer" in r),
    }


def make_generator(cfg: SelfInstructConfig) -> Generator:
    if bool(cfg.model_name_or_path) == bool(cfg.api_base):
        raise ValueError("pass either --model_name_or_path M (a local model) or --api_base URL --model NAME (an OpenAI-compatible server)")
    if cfg.api_base:
        if not cfg.model:
            raise ValueError("--api_base needs --model NAME (the model the server should use)")
        return OpenAIGenerator(cfg.api_base, cfg.model, cfg.api_key or os.environ.get("OPENAI_API_KEY"), cfg.api_mode,
                               cfg.max_concurrency, cfg.max_retries, cfg.request_timeout)
    return LocalGenerator(cfg.model_name_or_path, cfg.batch_size, cfg.use_chat_template)


def check_config(cfg: SelfInstructConfig) -> None:
    if cfg.num_instructions < 1:
        raise ValueError("--num_instructions must be at least 1")
    if not 0 <= cfg.num_machine_instructions <= cfg.num_prompt_instructions or cfg.num_prompt_instructions < 1:
        raise ValueError("need 1 <= --num_prompt_instructions and 0 <= --num_machine_instructions <= --num_prompt_instructions")
    if min(cfg.prompts_per_round, cfg.max_new_per_prompt, cfg.max_instruction_tokens, cfg.max_instance_tokens, cfg.max_stalled_rounds) < 1:
        raise ValueError("--prompts_per_round, --max_new_per_prompt, --max_*_tokens and --max_stalled_rounds must be at least 1")
    if not 0 < cfg.similarity_threshold <= 1:
        raise ValueError("--similarity_threshold must be in (0, 1]")


def run_self_instruct(cfg: SelfInstructConfig, generator: Generator | None = None) -> dict:
    """Run rounds until `num_instructions` accepted instructions are in `output_dir` (continuing what is there)."""
    from rich.progress import Progress

    from alignkit.data.similarity import RougePool

    check_config(cfg)
    seeds = load_seed_tasks(cfg.seed_tasks)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (ACCEPTED, REJECTED):
        (out / name).touch()
    accepted, rejected = read_log(out / ACCEPTED), read_log(out / REJECTED)
    if len(accepted) < cfg.num_instructions:  # a finished directory only needs its report rewritten
        generator = generator or make_generator(cfg)
    machine = [row["instruction"] for row in accepted]
    pool = RougePool([t.instruction for t in seeds] + machine)
    round_index = max((row["round"] for row in accepted + rejected), default=0)
    stalled, start = 0, time.perf_counter()
    with Progress(disable=not cfg.progress) as progress:
        bar = progress.add_task("self-instruct", total=cfg.num_instructions, completed=min(len(accepted), cfg.num_instructions))
        while len(accepted) < cfg.num_instructions and stalled < cfg.max_stalled_rounds:
            round_index += 1
            new, dropped = run_round(round_index, seeds, machine, pool, generator, cfg, len(accepted), cfg.num_instructions - len(accepted))
            append_log(out / ACCEPTED, new)  # accepted first: a crash between the two writes loses no accepted row
            append_log(out / REJECTED, dropped)
            accepted += new
            rejected += dropped
            for row in new:
                pool.add(row["instruction"])
                machine.append(row["instruction"])
            stalled = 0 if new else stalled + 1
            progress.update(bar, completed=len(accepted),
                            description=f"round {round_index}: +{len(new)} accepted, +{len(dropped)} rejected")

    atomic.write_jsonl(out / SFT, sft_rows(accepted))
    report = build_report(accepted, rejected, len(seeds))
    report["stopped"] = "target reached" if len(accepted) >= cfg.num_instructions else f"no instruction accepted in {stalled} rounds in a row"
    report["elapsed_s_this_run"] = round(time.perf_counter() - start, 1)
    report["config"] = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    atomic.write_json(out / REPORT, report, indent=2)
    return report


def format_report(report: dict) -> str:
    lines = [f"accepted {report['accepted']} of {report['candidates']} candidates in {report['rounds']} rounds "
             f"({report['acceptance_rate']:.1%}); {report['instances']} instances; "
             f"classification share {report['classification_share']:.1%}; {report['stopped']}",
             "rejected by reason:"]
    lines += [f"  {reason:<24} {n}" for reason, n in report["rejected_by_reason"].items()]
    lines.append("max ROUGE-L against the pool (candidates that passed the other filters):")
    peak = max(report["similarity_histogram"].values()) or 1
    lines += [f"  {b}  {n:>5}  {'#' * round(40 * n / peak)}" for b, n in report["similarity_histogram"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI


def run_self_instruct_command(cfg: SelfInstructConfig) -> None:
    report = run_self_instruct(cfg)
    print(format_report(report))
    print(f"wrote {cfg.output_dir}/{ACCEPTED}, {REJECTED}, {SFT} ({report['instances']} rows), {REPORT}")

self_instruct_command = command_from(SelfInstructConfig, run_self_instruct_command)

app = typer.Typer(add_completion=False, **APP_SETTINGS, help="Self-Instruct synthetic instruction data.")
app.command("self-instruct")(self_instruct_command)
