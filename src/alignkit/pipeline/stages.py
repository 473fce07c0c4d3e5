"""The training-side stages: data, sft, compare, rm, ppo, dpo. Each reads its inputs from RUN/<input stage>/,
writes its outputs to RUN/<stage>/ and returns a summary (saved as RUN/<stage>/result.json). Training reuses the
stage functions (`run_sft`, `run_rm`, `run_ppo`, `run_dpo`); nothing here trains by itself.

Each stage runs in its own process (`python -m alignkit.pipeline.stages STAGE RUN [--resume]`, started by
`runner.py`), so its CPU time and peak memory are its own and a crash or kill leaves the other stages' files alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import sys
from pathlib import Path

from alignkit import atomic
from alignkit.pipeline.recipe import Recipe, recipe_from_dict
from alignkit.progress import configure_logging

log = logging.getLogger(__name__)
HUMAN_STORE = "human_judgments.sqlite"  # RUN/<this>: the judgments people made in the comparison page (judge: human)
KILL_HOOK = "ALIGNKIT_PIPELINE_KILL_AFTER_CHECKPOINT"  # tests: SIGKILL the whole run right after the PPO stage's Nth checkpoint


def model_path(recipe: Recipe, run: Path) -> str:
    """The pretrained model: the recipe's, or under --quick the tiny random one in RUN/quick-model."""
    return str(run / "quick-model") if recipe.model == "tiny" else recipe.model


def train_config(cls: type, recipe: Recipe, run: Path, stage: str, resume: bool, **values):
    """cls(**values) plus the knobs every pipeline training stage shares; only fields `cls` has are passed."""
    shared = dict(output_dir=str(run / stage), seed=recipe.seed, mixed_precision=recipe.mixed_precision, logging_steps=1, progress=sys.stderr.isatty(),
                  resume_from_checkpoint="latest" if resume else "", overwrite_output_dir=not resume, save_total_limit=2)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**shared, **values}.items() if k in names})


def write_rows(rows: list[dict], path: Path) -> None:
    """JSONL to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(temporary, path)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# data


def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(first, second) with about `fraction` of the rows in second, by a seeded shuffle."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = len(rows) - max(1, round(fraction * len(rows))) if len(rows) > 1 else len(rows)
    return [rows[i] for i in sorted(order[:cut])], [rows[i] for i in sorted(order[cut:])]


def _eval_rows(source: str, limit: int, seed: int) -> list[dict]:
    """Held-out prompt/completion rows from any SFT format or an instruction file (references = completion)."""
    from alignkit.evaluate.winrate import read_prompts

    prompts, columns = read_prompts(source, limit or None, seed)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, columns["completion"])]


def stage_data(recipe: Recipe, run: Path, resume: bool) -> dict:
    """RUN/data/: sft_train.jsonl (SFT rows), prompts.jsonl (held out from SFT: comparisons and PPO), eval.jsonl
    (held-out test prompts with references)."""
    from alignkit.data import tasks

    spec, out = recipe.data, run / "data"
    if spec.source == "builtin":
        sft, prompts = [], []
        for name in spec.tasks:  # the first rows of a task do not depend on n: SFT takes them, the prompts the rest
            rows = tasks.make_task(name, "train", spec.sft_per_task + spec.prompts_per_task, recipe.seed)
            sft += rows[: spec.sft_per_task]
            prompts += rows[spec.sft_per_task :]
        random.Random(recipe.seed).shuffle(sft)
        random.Random(recipe.seed + 1).shuffle(prompts)
        evaluation = tasks.make_mixture(spec.tasks, "test", spec.eval_per_task, recipe.seed)
    elif spec.source == "files":
        from alignkit.data.formats import load_sft_examples, InvalidRows

        load_sft_examples(spec.train_file, "train", InvalidRows())  # refuse a bad file here, naming its line
        shutil.copyfile(spec.train_file, out / ("sft_train" + Path(spec.train_file).suffix))
        sft = None
        prompts = _eval_rows(spec.prompts_file, 0, recipe.seed) if spec.prompts_file else []
        evaluation = _eval_rows(spec.eval_file, spec.eval_limit, recipe.seed) if spec.eval_file else []
    else:  # self_instruct
        from alignkit.data.self_instruct import SelfInstructConfig, run_self_instruct

        settings = dict(output_dir=str(out / "self_instruct"), num_instructions=spec.num_instructions, seed=recipe.seed,
                        progress=sys.stderr.isatty())
        if spec.api_base:
            settings.update(api_base=spec.api_base, model=spec.api_model)
        else:
            settings.update(model_name_or_path=spec.generator_model or model_path(recipe, run))
        if spec.seed_tasks:
            settings["seed_tasks"] = spec.seed_tasks
        report = run_self_instruct(SelfInstructConfig(**settings))
        generated = [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), "completion": r["output"]}
                     for r in read_rows(out / "self_instruct" / "sft.jsonl")]
        if not generated:
            raise RuntimeError(f"self-instruct accepted no instruction (rejected: {report.get('rejected_by_reason')}); the generator "
                               "wrote nothing usable (a --quick random model never does): use a real model or data.api_base")
        sft, prompts = _split(generated, 0.2, recipe.seed)
        evaluation = _eval_rows(spec.eval_file, spec.eval_limit, recipe.seed) if spec.eval_file else []
        counts = {"accepted_instructions": report["accepted"], "candidate_instructions": report["candidates"],
                  "rejected_instructions": report["candidates"] - report["accepted"], "rounds": report["rounds"],
                  **{f"rejected/{reason}": n for reason, n in report["rejected_by_reason"].items()}}
    if sft is not None:
        write_rows(sft, out / "sft_train.jsonl")
    write_rows(prompts, out / "prompts.jsonl")
    write_rows(evaluation, out / "eval.jsonl")
    return {"sft_rows": len(sft) if sft is not None else None, "prompts": len(prompts), "eval_prompts": len(evaluation), "source": spec.source,
            **(counts if spec.source == "self_instruct" else {})}


def sft_file(run: Path) -> Path:
    return next(p for p in sorted((run / "data").glob("sft_train.*")))


# ---------------------------------------------------------------------------------------------
# sft


def stage_sft(recipe: Recipe, run: Path, resume: bool) -> dict:
    from alignkit.config import SFTConfig
    from alignkit.train.sft import run_sft

    spec = recipe.sft
    evaluation = run / "data" / "eval.jsonl"
    has_references = evaluation.exists() and any(r.get("completion") for r in read_rows(evaluation))
    cfg = train_config(
        SFTConfig, recipe, run, "sft", resume, model_name_or_path=model_path(recipe, run), dataset=str(sft_file(run)),
        eval_dataset=str(evaluation) if has_references else "", max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, lr_scheduler_type=spec.lr_scheduler_type, warmup_ratio=spec.warmup_ratio,
        max_length=spec.max_length, use_peft=spec.use_peft, save_steps=spec.save_steps,
    )
    return run_sft(cfg)


# ---------------------------------------------------------------------------------------------
# compare


def format_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Prompts as the SFT model saw them in training (a user turn, chat template or separator)."""
    from alignkit.data.tokenize import Formatting, prompt_text

    return [prompt_text(tokenizer, [{"role": "user", "content": p}], Formatting()) for p in prompts]


def stage_compare(recipe: Recipe, run: Path, resume: bool) -> dict:
    """K samples per held-out prompt from the SFT model, labelled by the judge -> RUN/compare/pairs_{train,heldout}.jsonl
    (prompts split between them, so held-out comparisons share no prompt with training) and sft_responses.jsonl."""
    from alignkit.generation import SamplingParams, generate_text
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.pipeline import judges

    spec, out = recipe.compare, run / "compare"
    rows = read_rows(run / "data" / "prompts.jsonl")
    rows = rows[: spec.num_prompts] if spec.num_prompts else rows
    if not rows:
        raise ValueError("the compare stage has no prompts: set data.prompts_per_task (builtin) or data.prompts_file (files)")
    tokenizer, model = load_tokenizer(str(run / "sft")), load_causal_lm(str(run / "sft"))
    texts = format_prompts(tokenizer, [r["prompt"] for r in rows])
    k = spec.samples_per_prompt
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, seed=recipe.seed)
    flat = generate_text(model, tokenizer, [t for t in texts for _ in range(k)], params, 16, "sampling" if sys.stderr.isatty() else "")
    items = [{"prompt": r["prompt"], "completion": r.get("completion"), "responses": flat[i * k : (i + 1) * k]} for i, r in enumerate(rows)]
    if spec.judge == "gold":
        pairs, scores = judges.gold_preferences(items, recipe.gold_judge)
        for item, mine in zip(items, scores):
            item["gold_scores"] = mine
    elif spec.judge == "llm":
        pairs = judges.llm_preferences(items, spec.llm_base_url, spec.llm_model, os.environ.get(spec.llm_api_key_env))
    else:
        # people's judgments live beside the stage directories, not in RUN/compare: a rerun of compare (interrupted, or
        # its recipe changed) starts from an empty directory but must keep, and count, what people already judged
        pairs = judges.human_preferences(str(run / "sft"), items, run / HUMAN_STORE, spec.human_needed, spec.human_port)
    if not pairs:
        raise RuntimeError(f"the {spec.judge} judge preferred no response over another in {len(items)} prompts × {k} samples "
                           "(all tied): raise compare.samples_per_prompt or compare.temperature")
    prompts = sorted({p["prompt"] for p in pairs})
    train_prompts, heldout_prompts = _split(prompts, spec.heldout_fraction, recipe.seed)
    heldout = set(heldout_prompts)
    write_rows(items, out / "samples.jsonl")
    write_rows([p for p in pairs if p["prompt"] not in heldout], out / "pairs_train.jsonl")
    write_rows([p for p in pairs if p["prompt"] in heldout], out / "pairs_heldout.jsonl")
    # the reward model is normalized on these; an empty answer is no SFT row (the readers refuse it), so it is left out
    write_rows([{"prompt": i["prompt"], "completion": r} for i in items for r in i["responses"] if r.strip()], out / "sft_responses.jsonl")
    return {"prompts": len(items), "samples_per_prompt": k, "pairs": len(pairs), "pairs_train": len(pairs) - sum(p["prompt"] in heldout for p in pairs),
            "pairs_heldout": sum(p["prompt"] in heldout for p in pairs), "judge": spec.judge}


# ---------------------------------------------------------------------------------------------
# rm, ppo, dpo


def stage_rm(recipe: Recipe, run: Path, resume: bool) -> dict:
    """The reward model on the training comparisons, evaluated on the held-out ones, normalized so the SFT model's
    responses score 0 on average (as InstructGPT does before RL)."""
    from alignkit.config import RMConfig
    from alignkit.train.rm import run_rm

    spec, compare = recipe.rm, run / "compare"
    cfg = train_config(
        RMConfig, recipe, run, "rm", resume, model_name_or_path=str(run / "sft"), dataset=str(compare / "pairs_train.jsonl"),
        eval_dataset=str(compare / "pairs_heldout.jsonl"), normalize_dataset=str(compare / "sft_responses.jsonl"),
        max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size, learning_rate=spec.learning_rate, save_steps=spec.save_steps,
    )
    return run_rm(cfg)


def _kill_after_checkpoint(target: int) -> None:
    """Test hook: after the PPO stage's `target`-th checkpoint is on disk, SIGKILL the pipeline and this process
    (as a power cut or the OOM killer would)."""
    from alignkit.train import loop

    original, saved = loop.save_checkpoint, []

    def save_then_kill(*args, **kwargs):
        original(*args, **kwargs)
        saved.append(args[0])
        if len(saved) == target:
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    loop.save_checkpoint = save_then_kill


def stage_ppo(recipe: Recipe, run: Path, resume: bool) -> dict:
    """PPO (or RLOO/GRPO) from the SFT model against the reward model, KL to the SFT model; the gold judge scores the
    same samples each iteration (logged as gold_score, never trained on)."""
    from alignkit.config import PPOConfig
    from alignkit.rl.ppo import run_ppo

    if os.environ.get(KILL_HOOK):
        _kill_after_checkpoint(int(os.environ[KILL_HOOK]))
    spec = recipe.ppo
    cfg = train_config(
        PPOConfig, recipe, run, "ppo", resume, model_name_or_path=str(run / "sft"), dataset=str(run / "data" / "prompts.jsonl"),
        reward_model=str(run / "rm"), gold_reward_fn=recipe.gold_judge, advantage_estimator="gae" if spec.algorithm == "ppo" else spec.algorithm,
        num_samples_per_prompt=spec.samples_per_prompt, rollout_batch_size=spec.rollout_batch_size, mini_batch_size=spec.mini_batch_size,
        num_ppo_epochs=spec.num_ppo_epochs, learning_rate=spec.learning_rate, lr_scheduler_type="constant", kl_coef=spec.kl_coef,
        temperature=spec.temperature, max_new_tokens=spec.max_new_tokens, max_steps=spec.max_steps, save_steps=spec.save_steps,
        kl_early_stop=spec.kl_early_stop, use_peft=spec.use_peft,
    )
    return run_ppo(cfg)


def stage_dpo(recipe: Recipe, run: Path, resume: bool) -> dict:
    """DPO from the SFT model on the same comparisons (the SFT model is the reference)."""
    from alignkit.config import DPOConfig
    from alignkit.train.dpo import run_dpo

    spec, compare = recipe.dpo, run / "compare"
    cfg = train_config(
        DPOConfig, recipe, run, "dpo", resume, model_name_or_path=str(run / "sft"), dataset=str(compare / "pairs_train.jsonl"),
        eval_dataset=str(compare / "pairs_heldout.jsonl"), beta=spec.beta, loss_type=spec.loss_type, max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size, learning_rate=spec.learning_rate, save_steps=spec.save_steps,
    )
    return run_dpo(cfg)


def run_stage(stage: str, run: Path, resume: bool) -> dict:
    from alignkit.pipeline import evaluation, report

    recipe = recipe_from_dict(json.loads((run / "recipe.json").read_text()))
    functions = {"data": stage_data, "sft": stage_sft, "compare": stage_compare, "rm": stage_rm, "ppo": stage_ppo, "dpo": stage_dpo,
                 "eval": evaluation.stage_eval, "report": report.stage_report}
    (run / stage).mkdir(parents=True, exist_ok=True)
    result = functions[stage](recipe, run, resume) or {}
    payload = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, type(None)))}
    atomic.write_json(run / stage / "result.json", payload)
    return payload


def main(argv: list[str]) -> int:
    """python -m alignkit.pipeline.stages STAGE RUN [--resume]; exit 2 with a one-line message on a user error."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_logging(verbose=False)  # as every command without --verbose: no transformers weight-loading bars or info logs
    stage, run = argv[0], Path(argv[1])
    try:
        run_stage(stage, run, "--resume" in argv[2:])
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        log.error(f"error in stage {stage}: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
