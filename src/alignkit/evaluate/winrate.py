"""Win rate of model A over model B on a prompt set, by a judge; KL(policy ‖ reference) on the same prompts.

Judges (`--judge`), each returning P(first response is better) ∈ {0, ½, 1} per prompt:
  reward_model:DIR              a trained reward model (`alignkit rm`) scores each response; the higher wins
  builtin:NAME | module:fn      a pointwise reward function (as in `alignkit ppo --reward_fn`: builtin:exact_match,
    | file.py:fn                builtin:sentiment, builtin:rouge_l against the row's reference); the higher wins
  pairwise:module:fn            fn(prompts, first, second) -> preferences for the first, in [0, 1]
  llm:BASE_URL                  an OpenAI-compatible chat endpoint (`--judge_model`), asked which of two responses
                                is better; answers "A", "B" or "tie"

Every prompt is judged in both orders, (A, B) and (B, A), so a judge that favours a position cancels out:
    w_i = ½ · (J(x_i, a_i, b_i) + 1 − J(x_i, b_i, a_i)),     win rate = (1/N) Σ w_i
A prompt is a win for A when w_i > ½, a loss when w_i < ½, a tie otherwise. `consistency` is the share of prompts
whose two verdicts agree; `first_position_rate` is how often the judge preferred whichever response came first
(½ = no position bias).

KL(π ‖ π_ref) = E_{y∼π(·|x)} Σ_t [log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)], estimated from samples of the
policy at temperature 1 (no top-p/top-k), per prompt, with the k1 estimator (unbiased; single samples may be
negative) and k3 ((r − 1) − log r, r = π_ref/π: ≥ 0, lower variance) summed over the response tokens.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict
from alignkit.evaluate.config import WinRateConfig  # declared with the other eval flags

Judge = Callable[[list[str], list[str], list[str]], list[float]]


# ---------------------------------------------------------------------------------------------
# the both-orders logic


def win_rate(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], judge: Judge) -> dict:
    """Judge every prompt in both orders; -> win_rate, wins, losses, ties, consistency, first_position_rate, per_prompt."""
    if not (len(prompts) == len(responses_a) == len(responses_b)) or not prompts:
        raise ValueError(f"win rate needs as many responses as prompts: {len(prompts)} prompts, {len(responses_a)} A, {len(responses_b)} B")
    ab = [float(v) for v in judge(list(prompts), list(responses_a), list(responses_b))]
    ba = [float(v) for v in judge(list(prompts), list(responses_b), list(responses_a))]
    if len(ab) != len(prompts) or len(ba) != len(prompts):
        raise ValueError(f"the judge returned {len(ab)} and {len(ba)} verdicts for {len(prompts)} prompts")
    if any(not 0.0 <= v <= 1.0 for v in ab + ba):
        raise ValueError("a judge must return preferences for the first response in [0, 1]")
    scores = [(x + 1.0 - y) / 2 for x, y in zip(ab, ba)]
    n = len(scores)

    def side(v: float) -> int:
        return (v > 0.5) - (v < 0.5)

    return {
        "win_rate": sum(scores) / n,
        "wins": sum(s > 0.5 for s in scores), "losses": sum(s < 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores),
        "consistency": sum(side(x) == side(1.0 - y) for x, y in zip(ab, ba)) / n,
        "first_position_rate": (sum(ab) + sum(ba)) / (2 * n),
        "n": n,
        "per_prompt": [{"a_first": x, "b_first": y, "score_a": s} for x, y, s in zip(ab, ba, scores)],
    }


def pointwise_judge(score: Callable[[list[str], list[str]], list[float]]) -> Judge:
    """A judge from a scorer of single responses: 1 if the first scores higher, 0 if lower, ½ on a tie."""

    def judge(prompts, first, second):
        s1, s2 = score(prompts, first), score(prompts, second)
        return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(s1, s2)]

    judge.score = score
    return judge


# ---------------------------------------------------------------------------------------------
# an OpenAI-compatible LLM judge

JUDGE_SYSTEM = "You compare two answers to the same request and say which one serves the user better."
JUDGE_TEMPLATE = """Request:
{prompt}

Answer A:
{first}

Answer B:
{second}

Which answer is more helpful, correct and harmless? Consider only quality, not length or order. Reply with exactly one of: A, B, tie."""


def parse_verdict(text: str) -> float | None:
    """The judge's reply -> preference for the first answer: "A" -> 1, "B" -> 0, "tie" -> ½; None if unreadable."""
    words = re.findall(r"[A-Za-z]+", text.strip())
    if not words:
        return None
    first = words[0].lower()
    if first in ("a", "b"):
        return 1.0 if first == "a" else 0.0
    if first in ("tie", "equal", "both"):
        return 0.5
    match = re.search(r"\b(?i:answer|response)\s+([AB])\b", text)
    return (1.0 if match.group(1) == "A" else 0.0) if match else None


class LLMJudge:
    """Ask an OpenAI-compatible endpoint's chat completions (temperature 0) through the official `openai` client.
    Unreadable replies count as ties and are counted in `unreadable`. `client`: an `openai.OpenAI` (or anything
    with its `chat.completions.create`), for tests or a custom transport."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, client=None, timeout: float = 60.0):
        if not model:
            raise ValueError("an llm judge needs --judge_model (the model name the endpoint serves)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        if client is None:
            import openai

            # a local server needs no key, but the client refuses to start without one
            client = openai.OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                   timeout=timeout, max_retries=2)
        self.client = client
        self.unreadable = 0
        self.calls = 0

    def verdict(self, prompt: str, first: str, second: str) -> float:
        import openai

        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": JUDGE_TEMPLATE.format(prompt=prompt, first=first, second=second)}]
        try:
            completion = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0, max_tokens=8)
            text = completion.choices[0].message.content
        except (openai.OpenAIError, IndexError, AttributeError) as error:
            raise RuntimeError(f"llm judge at {self.base_url}/chat/completions: {error}") from None
        self.calls += 1
        value = parse_verdict(text or "")
        if value is None:
            self.unreadable += 1
            return 0.5
        return value

    def __call__(self, prompts, first, second):
        return [self.verdict(p, a, b) for p, a, b in zip(prompts, first, second)]


def reward_model_scorer(directory: str, batch_size: int = 16):
    """(prompts, responses) -> rewards from an `alignkit rm` model, each pair tokenized exactly as the reward model
    was trained (its saved formatting: chat template or separator, end of turn included)."""
    from alignkit.data.tokenize import tokenize_example
    from alignkit.models import load_tokenizer
    from alignkit.reward_model import load_reward_model, score_sequences, training_formatting

    tokenizer = load_tokenizer(directory)
    rm, head_is_new = load_reward_model(directory)
    if head_is_new:
        raise ValueError(f"--judge reward_model:{directory} is not a reward model (no trained score head); train one with `alignkit rm`")
    fmt = training_formatting(directory)

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        sequences = [tokenize_example({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}, tokenizer, fmt)[0]
                     for p, r in zip(prompts, responses)]
        return score_sequences(rm, sequences, tokenizer.pad_token_id, batch_size)

    return score


def rouge_l_reward(prompts: list[str], responses: list[str], completion: list[str] | None = None, **columns) -> list[float]:
    """builtin:rouge_l: ROUGE-L F (0–100) of the response against the row's reference (`completion`)."""
    from alignkit.evaluate.metrics import rouge_l_scores

    if completion is None:
        raise ValueError("builtin:rouge_l needs reference answers in the prompt data (a completion/output column)")
    return rouge_l_scores(responses, completion)


def build_judge(spec: str, columns: dict[str, list], judge_model: str = "", api_key: str | None = None, client=None):
    """A judge from its --judge spec; `columns` are the prompt rows' other fields (e.g. completion), one list each."""
    from alignkit.rl.rewards import call_reward, load_reward_function

    if not spec:
        raise ValueError("--judge is required: reward_model:DIR, builtin:NAME, module:function, pairwise:module:function or llm:BASE_URL")
    kind, _, rest = spec.partition(":")
    if kind == "llm":
        return LLMJudge(rest, judge_model, api_key, client)
    if kind == "reward_model":
        return pointwise_judge(reward_model_scorer(rest))
    if kind == "pairwise":
        fn = load_reward_function(rest)
        return lambda prompts, first, second: [float(v) for v in fn(prompts, first, second)]
    fn = rouge_l_reward if spec == "builtin:rouge_l" else load_reward_function(spec)
    return pointwise_judge(lambda prompts, responses: call_reward(fn, prompts, responses, columns))


# ---------------------------------------------------------------------------------------------
# KL(policy ‖ reference)


def sequence_kl(policy, reference, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, samples: int = 1,
                batch_size: int = 16, seed: int = 0) -> dict:
    """Monte-Carlo KL(π ‖ π_ref) per prompt from `samples` responses of π each (temperature 1, unfiltered)."""
    import torch

    from alignkit.generation import SamplingParams
    from alignkit.rl.rollout import policy_forward, rollout

    k1, k3, lengths = [], [], []
    repeated = [p for p in prompt_ids for _ in range(samples)]
    for index, start in enumerate(range(0, len(repeated), batch_size)):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=seed + index)
        episodes = rollout(policy, tokenizer, repeated[start : start + batch_size], params)
        with torch.no_grad():
            logp = policy_forward(policy, episodes, 1.0).logprobs.cpu()
            ref = policy_forward(reference, episodes, 1.0).logprobs.cpu()
        mask = episodes.response_mask.cpu().float()
        log_ratio = (ref - logp) * mask  # log r, r = π_ref / π
        k1 += (-log_ratio).sum(1).tolist()
        k3 += ((torch.expm1(log_ratio) - log_ratio) * mask).sum(1).tolist()
        lengths += mask.sum(1).tolist()
    per_prompt = lambda values: [sum(values[i * samples : (i + 1) * samples]) / samples for i in range(len(prompt_ids))]
    k1_prompt, k3_prompt = per_prompt(k1), per_prompt(k3)
    n = len(prompt_ids)
    return {"kl_k1": sum(k1_prompt) / n, "kl_k3": sum(k3_prompt) / n, "kl_k1_per_token": sum(k1) / max(sum(lengths), 1),
            "mean_response_tokens": sum(lengths) / len(lengths), "samples_per_prompt": samples, "n": n, "per_prompt_k1": k1_prompt}


# ---------------------------------------------------------------------------------------------
# the command


def read_prompts(source: str, limit: int | None, seed: int) -> tuple[list[str], dict[str, list]]:
    """User prompts and their reference answers (column `completion`) from any SFT format, builtin:TASK[:N]
    or an instruction file (see suites.read_instructions)."""
    from pathlib import Path

    from alignkit.evaluate.suites import _shuffled, read_instructions

    if not source:
        raise ValueError("--dataset is required: the prompts to answer (any SFT format, builtin:TASK[:N] or an instruction file)")
    if source.startswith("builtin:"):
        from alignkit.data.formats import read_rows

        rows = [{"prompt": r.data["prompt"], "references": [r.data["completion"]]} for r in read_rows(source, "test")]
    elif not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such file")
    else:
        from alignkit.data.formats import read_rows

        raw = read_rows(source, "train")
        if raw and isinstance(raw[0].data.get("prompt"), str) and "completion" not in raw[0].data:  # prompts alone
            rows = [{"prompt": _prompt_of(r), "references": [None]} for r in raw]
        else:
            rows = read_instructions(source)
    rows = _shuffled(rows, seed, limit)
    return [r["prompt"] for r in rows], {"completion": [r["references"][0] for r in rows]}


def _prompt_of(row) -> str:
    from alignkit.data.formats import DataError

    prompt = row.data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(row.where, "must be a non-empty string", field="prompt")
    return prompt


def run_winrate(cfg: WinRateConfig, models: tuple | None = None, client=None, log=print) -> dict:
    """Generate A's and B's responses, judge them in both orders, and estimate KL(A ‖ B)."""

    from alignkit.data.tokenize import Formatting, prompt_text
    from alignkit.evaluate.report import markdown_table, plot_bars, sidecar, write_json, write_predictions, write_markdown
    from alignkit.evaluate.runner import load_model
    from alignkit.generation import SamplingParams, generate_text

    if not cfg.ref_model and models is None:
        raise ValueError("--ref_model is required: the model B that A is compared with (and the KL reference)")
    prompts, columns = read_prompts(cfg.dataset, cfg.limit, cfg.seed)
    judge = build_judge(cfg.judge, columns, cfg.judge_model, os.environ.get(cfg.judge_api_key_env), client)
    (model_a, tok_a), (model_b, tok_b) = models or (load_model(cfg.model_name_or_path, cfg.device), load_model(cfg.ref_model, cfg.device))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    responses = {}
    for name, model, tok in (("a", model_a, tok_a), ("b", model_b, tok_b)):
        texts = [prompt_text(tok, [{"role": "user", "content": p}], Formatting()) for p in prompts]
        responses[name] = generate_text(model, tok, texts, params, cfg.batch_size, f"responses of {name.upper()}" if cfg.progress else "")
    result = win_rate(prompts, responses["a"], responses["b"], judge)
    summary = {k: v for k, v in result.items() if k != "per_prompt"}
    if isinstance(judge, LLMJudge):
        summary["judge_unreadable"] = judge.unreadable
    if getattr(judge, "score", None) is not None:  # a pointwise judge: the mean score of each side too
        for name in ("a", "b"):
            scores = judge.score(list(prompts), responses[name])
            summary[f"mean_score_{name}"] = sum(scores) / len(scores)
        log(f"mean score: A {summary['mean_score_a']:.3f}, B {summary['mean_score_b']:.3f}")
    log(f"win rate of A over B: {summary['win_rate']:.3f} ({summary['wins']} wins, {summary['losses']} losses, {summary['ties']} ties; "
        f"consistency {summary['consistency']:.2f}, first-position rate {summary['first_position_rate']:.2f}, n={summary['n']})")
    kl = None
    if cfg.kl:
        if tok_a.get_vocab() != tok_b.get_vocab():
            log("KL skipped: A and B have different tokenizers")
        else:
            ids = [tok_a(prompt_text(tok_a, [{"role": "user", "content": p}], Formatting()), add_special_tokens=False)["input_ids"] for p in prompts]
            kl = sequence_kl(model_a, model_b, tok_a, ids, cfg.max_new_tokens, cfg.kl_samples, cfg.batch_size, cfg.seed)
            log(f"KL(A ‖ B): k1 {kl['kl_k1']:.3f}, k3 {kl['kl_k3']:.3f} nats per response ({kl['mean_response_tokens']:.1f} tokens)")
    from alignkit.evaluate.report import record

    records = [record("winrate", None, m, summary[m], summary["n"], judge=cfg.judge) for m in ("win_rate", "consistency", "first_position_rate")]
    if kl:
        records += [record("kl", None, m, kl[m], kl["n"]) for m in ("kl_k1", "kl_k3", "kl_k1_per_token")]
    payload = {"settings": asdict(cfg), "summary": summary, "kl": {k: v for k, v in (kl or {}).items() if k != "per_prompt_k1"} or None,
               "records": records}
    write_json(payload, cfg.output)
    write_predictions([{"prompt": p, "response_a": a, "response_b": b, **v, "reference": ref}
                       for p, a, b, v, ref in zip(prompts, responses["a"], responses["b"], result["per_prompt"], columns["completion"])], cfg.output)
    png = plot_bars({"A wins": summary["wins"] / summary["n"], "ties": summary["ties"] / summary["n"], "B wins": summary["losses"] / summary["n"],
                     "consistency": summary["consistency"]}, sidecar(cfg.output, ".png"), "share of prompts")
    table = markdown_table([summary], ["win_rate", "wins", "losses", "ties", "consistency", "first_position_rate",
                                       *(["mean_score_a", "mean_score_b"] if "mean_score_a" in summary else []), "n"])
    if kl:
        table += "\n\n" + markdown_table([kl], ["kl_k1", "kl_k3", "kl_k1_per_token", "mean_response_tokens", "samples_per_prompt", "n"])
    write_markdown(cfg.output, f"## Win rate of `{cfg.model_name_or_path}` (A) over `{cfg.ref_model}` (B), judge `{cfg.judge}`\n\n"
                                          f"{table}\n\n![verdicts]({png.name})\n")
    return payload
