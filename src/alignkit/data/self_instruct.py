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

The prompts, completion parsers and filters (steps 1-5's text) are in `self_instruct_prompts.py`; this module
holds the configuration, the rounds, the output files and the command.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from alignkit import atomic
from alignkit.config import knob
from alignkit.data.formats import DataError
from alignkit.data.generators import Generator, LocalGenerator, OpenAIGenerator
from alignkit.data.self_instruct_prompts import (SeedTask, classification_prompt, classification_shots, filter_instances, instance_prompt,
                                                instance_shots, instruction_filter_reason, instruction_prompt, load_seed_tasks,
                                                parse_classification, parse_instances, parse_instructions, sample_prompt_instructions)
from alignkit.flags import APP_SETTINGS, command_from
from alignkit.progress import progress_bar

if TYPE_CHECKING:
    from alignkit.data.similarity import RougePool  # imported where used: rouge_score pulls in nltk (~1 s)

BUILTIN_SEED_TASKS = str(Path(__file__).with_name("seed_tasks.jsonl"))
ACCEPTED, REJECTED, SFT, REPORT = "accepted.jsonl", "rejected.jsonl", "sft.jsonl", "report.json"
logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------- one round


def run_round(round_index: int, seeds: list[SeedTask], machine: list[str], pool: RougePool, generator: Generator,
              cfg: SelfInstructConfig, first_id: int, room: int) -> tuple[list[dict], list[dict]]:
    """Generate, filter and complete one round of candidates; returns (accepted rows, rejected rows)."""
    rng = random.Random(cfg.seed * 1_000_003 + round_index)
    seed_base = cfg.seed * 1_000_003 + round_index * 10
    seed_texts = [t.instruction for t in seeds]
    in_context = [sample_prompt_instructions(rng, seed_texts, machine, cfg.num_prompt_instructions, cfg.num_machine_instructions) for _ in range(cfg.prompts_per_round)]
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
    with progress_bar(cfg.progress) as progress:
        bar = progress.add_task("self-instruct", total=cfg.num_instructions, completed=min(len(accepted), cfg.num_instructions), status="")
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
                            status=f"round {round_index}: +{len(new)} accepted, +{len(dropped)} rejected")

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
    print(format_report(report))  # the command's output: what was made, on stdout
    logger.info(f"wrote {cfg.output_dir}/{ACCEPTED}, {REJECTED}, {SFT} ({report['instances']} rows), {REPORT}")

self_instruct_command = command_from(SelfInstructConfig, run_self_instruct_command)

app = typer.Typer(add_completion=False, **APP_SETTINGS, help="Self-Instruct synthetic instruction data.")
app.command("self-instruct")(self_instruct_command)
