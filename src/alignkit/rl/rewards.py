"""Reward sources for RL (PPO/RLOO/GRPO): a batch of prompts and responses -> one score each.

Every source is a callable  fn(prompts: list[str], responses: list[str], **columns) -> list[float]
where `columns` are the prompt data set's other fields, one list per field (e.g. `completion`, the
reference answer of a built-in task). A function receives the columns it names as parameters, or
all of them if it takes **kwargs. A trained reward model (`reward_model.py`) is one such source;
`build_reward` combines several with weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from alignkit.models import load_tokenizer
from alignkit.reward_model import load_reward_model, score_sequences


def call_reward(fn, prompts: list[str], responses: list[str], columns: dict[str, list]) -> list[float]:
    """fn's scores as floats, fn given the columns it names (all of them if it takes **kwargs); one per response."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        extra = dict(columns)
    else:
        extra = {k: v for k, v in columns.items() if k in list(params)[2:]}
    scores = [float(s) for s in fn(prompts, responses, **extra)]
    if len(scores) != len(responses):
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)} returned {len(scores)} scores for {len(responses)} responses")
    return scores


def exact_match_reward(prompts: list[str], responses: list[str], completion: list[str] | None = None, **columns) -> list[float]:
    """builtin:exact_match: 1.0 where the response matches the row's reference answer (`completion`, or
    `answer`/`reference`) under `data.tasks.exact_match`, else 0.0."""
    from alignkit.data.tasks import exact_match

    references = completion if completion is not None else columns.get("answer", columns.get("reference"))
    if references is None:
        raise ValueError("builtin:exact_match needs a reference answer column in the prompt data: completion, answer or reference")
    return [float(exact_match(r, ref)) for r, ref in zip(responses, references)]


_VADER = None


def sentiment_reward(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """builtin:sentiment: the VADER compound sentiment of the response, in [−1, 1] (vaderSentiment lexicon)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(r)["compound"] for r in responses]


BUILTIN_REWARDS = {"exact_match": exact_match_reward, "sentiment": sentiment_reward}


class RewardModelScorer:
    """A trained reward model directory (an `alignkit rm` output) as a reward source. Each response is tokenized
    with the reward model's tokenizer exactly as the reward model was trained and normalized (its saved formatting;
    `data.tokenize.tokenize_reply`: the prompt text as formatted for the policy, then the response as a closed
    assistant turn), so its saved normalization (`reward_offset`) centres these scores too. Whether a response
    ended on a stop token is left to PPO's missing-EOS penalty: the reward model saw every response closed."""

    def __init__(self, directory: str, batch_size: int = 16, device=None):
        from alignkit.reward_model import training_formatting

        self.tokenizer = load_tokenizer(directory)
        self.format = training_formatting(directory)
        self.rm, head_is_new = load_reward_model(directory)
        if head_is_new:
            raise ValueError(f"--reward_model {directory} is not a reward model (no trained score head); train one with `alignkit rm`")
        self.rm.requires_grad_(False)
        if device is not None:
            self.rm.to(device)
        self.batch_size = batch_size
        self.__name__ = f"reward_model:{directory}"

    def sequences(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        from alignkit.data.tokenize import tokenize_reply

        return [tokenize_reply(p, r, self.tokenizer, self.format) for p, r in zip(prompts, responses)]

    def __call__(self, prompts: list[str], responses: list[str], finished: list[bool] | None = None, **columns) -> list[float]:
        return score_sequences(self.rm, self.sequences(prompts, responses), self.tokenizer.pad_token_id, self.batch_size)


def load_reward_function(spec: str):
    """`builtin:NAME`, `package.module:function`, or `path/to/file.py:function` -> the callable."""
    import importlib
    import importlib.util

    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_REWARDS:
            raise ValueError(f"unknown built-in reward {spec!r}; choose one of: {', '.join('builtin:' + n for n in BUILTIN_REWARDS)}")
        return BUILTIN_REWARDS[name]
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        raise ValueError(f"--reward_fn {spec!r}: expected module:function, path/file.py:function or builtin:NAME")
    if target.endswith(".py"):
        if not os.path.exists(target):
            raise FileNotFoundError(f"--reward_fn {spec!r}: file {target} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"alignkit_reward_{Path(target).stem}", target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ValueError(f"--reward_fn {spec!r}: {target} has no function {attribute!r}")
    return fn


class CompositeReward:
    """Σ_i w_i · score_i over several sources; `last_components` keeps each source's raw scores."""

    def __init__(self, sources: list[tuple[str, object, float]]):
        if not sources:
            raise ValueError("no reward source: pass --reward_model DIR and/or --reward_fn SPEC")
        self.sources = sources  # (name, callable, weight)
        self.last_components: dict[str, list[float]] = {}

    def __call__(self, prompts: list[str], responses: list[str], **columns) -> list[float]:
        total = [0.0] * len(responses)
        self.last_components = {}
        for name, fn, weight in self.sources:
            scores = call_reward(fn, prompts, responses, columns)
            self.last_components[name] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        return total


def build_reward(reward_model: str = "", reward_fn: str = "", reward_weights: str = "", device=None) -> CompositeReward:
    """The PPO reward from flags: `reward_fn` is a comma-separated list of specs; `reward_weights` one
    weight per source, in the order reward model (if any) then functions (default: all 1)."""
    sources: list[tuple[str, object]] = []
    if reward_model:
        sources.append(("reward_model", RewardModelScorer(reward_model, device=device)))
    for spec in [s.strip() for s in reward_fn.split(",") if s.strip()]:
        sources.append((spec, load_reward_function(spec)))
    weights = [float(w) for w in reward_weights.split(",") if w.strip()] if reward_weights else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"--reward_weights has {len(weights)} weight(s) for {len(sources)} reward source(s)")
    return CompositeReward([(name, fn, w) for (name, fn), w in zip(sources, weights)])
