"""Reward models: a language model whose unembedding is replaced by a scalar head, and scoring with it.

A reward model is saved as a plain `AutoModelForSequenceClassification` directory (num_labels=1), so any
tool can load it. alignkit reads the reward itself (`RewardModel.forward`) instead of calling that
class's forward, which finds the last token as the last one that is not the pad id: when pad == eos
(the usual choice) and a response ends with eos, it would read the token before it.

Normalization (`alignkit rm --normalize_dataset`) shifts rewards by a constant: into the head's bias
where the head has one (BERT-style encoders), else into `config.reward_offset`, which `RewardModel`
adds (decoder heads, e.g. Llama's `score`, have no bias). `config.reward_mean`/`reward_std` record
the statistics that were measured.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit import atomic
from alignkit.models import _explained, load_causal_lm, load_tokenizer, resolve_model_path, unwrap_base


class RewardModel(torch.nn.Module):
    """One scalar reward per sequence.

    Decoders (transformers' classification models with a `score` head): the last layer's hidden state
    at the last real token, through the head. Encoders (BERT-style `classifier`): the model's own
    pooled output ([CLS]), which its attention mask already makes independent of padding.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def base(self):
        return unwrap_base(self.model)

    @property
    def decoder(self) -> bool:
        return hasattr(self.base, "score")

    def forward(self, input_ids, attention_mask, position_ids=None, last=None) -> torch.Tensor:
        """Rewards [N] (float32).

        `attention_mask` [B, T] marks real tokens (1) on either padding side; the reward of row b is
        read at its last real token. Shared-prompt batches (see `train.rm.collate`) pass instead a
        boolean [B, 1, T, T] mask (query may attend key), `position_ids`, and `last`: the flat
        indices (b·T + t) of the tokens whose hidden states give the N rewards.
        """
        base = self.base
        offset = float(getattr(base.config, "reward_offset", 0.0) or 0.0)
        if not self.decoder:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float() + offset
        if attention_mask.dim() == 4:
            from alignkit.packing import for_attention

            attention_mask = for_attention(attention_mask, base)
        trunk = getattr(base, base.base_model_prefix)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        if last is None:
            width = input_ids.shape[1]
            positions = torch.arange(width, device=input_ids.device)
            last = (attention_mask * positions).argmax(1) + torch.arange(len(input_ids), device=input_ids.device) * width
        return base.score(hidden.flatten(0, 1)[last])[:, 0].float() + offset


def reward_head(model) -> torch.nn.Linear:
    """The Linear layer that outputs the reward: `score` (decoders) or the last Linear of `classifier`."""
    base = unwrap_base(model)
    head = getattr(base, "score", None) if hasattr(base, "score") else getattr(base, "classifier", None)
    if head is None:
        raise ValueError(f"{type(base).__name__} has no `score` or `classifier` head: not a sequence-classification model")
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1]


def load_reward_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[RewardModel, bool]:
    """(RewardModel, head_is_new) from a reward-model dir, any causal LM, an encoder, or a LoRA adapter dir.

    Loading a causal LM as `AutoModelForSequenceClassification` drops its LM head and creates a new
    scalar head (`head_is_new`: the caller initialises it). A LoRA adapter dir (an SFT output) is
    merged into its base first.
    """
    import transformers
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the expected "score.weight newly initialized" report
    try:
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            causal = load_causal_lm(path, dtype).merge_and_unload()
            causal.config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(causal.config, dtype=dtype)
            getattr(model, model.base_model_prefix).load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
            return RewardModel(model), True
        with _explained(name_or_path):
            model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return RewardModel(model), any(key.split(".")[0] in ("score", "classifier") for key in info["missing_keys"])


def init_head(model, seed: int) -> None:
    """Small random head, N(0, 1/√(d+1)), zero bias: a reward starts at about the RMS of the final
    (normalized) hidden state, O(1), so the sigmoid of the loss is not saturated at step 1."""
    head = reward_head(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()


@torch.no_grad()
def score_sequences(rm: RewardModel, sequences: list[list[int]], pad_id: int, batch_size: int = 16, progress: bool = False,
                    row_tokens: int = -1) -> list[float]:
    """Rewards of token sequences, batched by similar length (less padding); in the input order.

    With `row_tokens` ≠ 0 (and a decoder that takes custom masks), a batch's shared prefixes — a chat
    template's system prompt, one prompt's several responses — are computed once, in rows of about
    `row_tokens` tokens (−1: the model's hidden size; see `rollout._state_hidden`)."""
    from alignkit.data.tokenize import pad_right
    from alignkit.packing import pack_sequences, supports_custom_masks
    from alignkit.train.loop import progress_bar

    row_tokens = rm.base.config.hidden_size if row_tokens < 0 else row_tokens
    shared = row_tokens > 0 and rm.decoder and supports_custom_masks(rm.model)

    rm.eval()
    device = next(rm.parameters()).device
    # shared rows: neighbours in token order share the longest prefixes; padded rows: in length order, the least padding
    order = sorted(range(len(sequences)), key=lambda i: sequences[i] if shared else len(sequences[i]))
    rewards = [0.0] * len(sequences)
    with progress_bar(progress) as bar:
        task = bar.add_task("score", total=len(sequences), status="")
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if shared:
                packed = pack_sequences([sequences[i] for i in chunk], row_tokens, pad_id)
                scores = rm(packed.input_ids.to(device), packed.attention_mask.to(device), packed.position_ids.to(device),
                            last=packed.states[:, 0].to(device))
            else:
                input_ids, attention_mask = pad_right([sequences[i] for i in chunk], pad_id)
                scores = rm(input_ids.to(device), attention_mask.to(device))
            for i, r in zip(chunk, scores.tolist()):
                rewards[i] = r
            bar.update(task, advance=len(chunk))
    return rewards


# ---------------------------------------------------------------------------------------------
# scoring files


@dataclass
class ScoringItem:
    row: dict  # the input row, echoed in the output
    sequences: list[list[int]]  # prompt + response token ids, one per response
    pairs: list[tuple[int, int]]  # (better, worse) for preference rows; empty for a single response


def read_for_scoring(source: str, split: str, tokenizer, fmt, invalid) -> list[ScoringItem]:
    """Preference rows (chosen/rejected or responses) or single responses (any SFT format)."""
    from alignkit.data.formats import DataError, detect_sft_format, read_rows, sft_example
    from alignkit.data.preferences import preference_example, tokenize_preference
    from alignkit.data.tokenize import tokenize_example

    rows = read_rows(source, split, invalid)
    if not rows:
        raise DataError(source, "no rows found (empty file?)")
    preference = "chosen" in rows[0].data or "responses" in rows[0].data
    sft_format = None if preference else detect_sft_format(rows[0])
    items = []
    for row in rows:
        try:
            if preference:
                tokenized = tokenize_preference(preference_example(row), tokenizer, fmt)
                items.append(ScoringItem(row.data, [tokenized.sequence(k) for k in range(len(tokenized.response_ids))], tokenized.pairs))
            else:
                items.append(ScoringItem(row.data, [tokenize_example(sft_example(row, sft_format), tokenizer, fmt)[0]], []))
        except DataError as error:
            invalid.report(error)
    return items


def pair_accuracy(rewards: list[float], pairs: list[tuple[int, int]]) -> float:
    return sum(rewards[b] > rewards[w] for b, w in pairs) / len(pairs)


def training_formatting(reward_model_dir: str):
    """The prompt formatting the reward model was trained with (its config.yaml), else the defaults."""
    import yaml

    from alignkit.data.tokenize import Formatting

    saved = Path(resolve_model_path(reward_model_dir), "config.yaml")
    cfg = yaml.safe_load(saved.read_text()) if saved.exists() else {}
    return Formatting(cfg.get("use_chat_template", "auto"), cfg.get("separator", Formatting.separator))


def score_file(reward_model: str, dataset: str, output: str, split: str = "train", batch_size: int = 16,
               skip_invalid: bool = False, progress: bool = True) -> dict:
    """Write OUTPUT.jsonl: each input row plus `reward` (single responses), or `reward_chosen`,
    `reward_rejected`, `agrees` (pairs), or `rewards` [K] and `agrees` = fraction of its pairs ordered
    like the labels (rankings). Returns a summary (rows, mean reward, and accuracy for preferences)."""
    from alignkit.data.formats import InvalidRows, write_jsonl

    tokenizer = load_tokenizer(reward_model)
    rm, head_is_new = load_reward_model(reward_model)
    if head_is_new:
        raise ValueError(f"{reward_model} is not a reward model (it has no trained score head); train one with `alignkit rm`")
    invalid = InvalidRows(skip=skip_invalid)
    items = read_for_scoring(dataset, split, tokenizer, training_formatting(reward_model), invalid)
    flat = [s for item in items for s in item.sequences]
    rewards = score_sequences(rm, flat, tokenizer.pad_token_id, batch_size, progress)
    out, cursor, agreement = [], 0, []
    for item in items:
        mine, cursor = rewards[cursor : cursor + len(item.sequences)], cursor + len(item.sequences)
        if not item.pairs:
            out.append({**item.row, "reward": mine[0]})
        elif "chosen" in item.row:
            agreement.append(float(mine[0] > mine[1]))
            out.append({**item.row, "reward_chosen": mine[0], "reward_rejected": mine[1], "agrees": mine[0] > mine[1]})
        else:
            agreement.append(pair_accuracy(mine, item.pairs))
            out.append({**item.row, "rewards": mine, "agrees": agreement[-1]})
    write_jsonl(out, output)
    summary = {"rows": len(out), "responses": len(flat), "mean_reward": sum(rewards) / max(len(rewards), 1)}
    if agreement:
        summary["accuracy"] = sum(agreement) / len(agreement)
    if invalid.total:
        summary["invalid_skipped"] = dict(invalid.counts)
    return summary


def write_normalization(model_dir: str | Path, mean: float, std: float, source: str) -> None:
    """Shift saved rewards by −mean: into the head's bias if it has one, else config.reward_offset."""
    rm, _ = load_reward_model(str(model_dir))
    head = reward_head(rm.model)
    config = rm.model.config
    if head.bias is not None:
        with torch.no_grad():
            head.bias -= mean
        rm.model.save_pretrained(model_dir, safe_serialization=True)
    else:
        config.reward_offset = float(getattr(config, "reward_offset", 0.0) or 0.0) - mean
    config.reward_mean, config.reward_std, config.reward_normalize_dataset = mean, std, source
    config.save_pretrained(model_dir)
    atomic.write_json(Path(model_dir, "reward_normalization.json"), {"dataset": source, "mean": mean, "std": std})


# ---------------------------------------------------------------------------------------------
# reward sources for RL (PPO/RLOO/GRPO): batch of prompts and responses -> one score each
#
# Every source is a callable  fn(prompts: list[str], responses: list[str], **columns) -> list[float]
# where `columns` are the prompt data set's other fields, one list per field (e.g. `completion`, the
# reference answer of a built-in task). A function receives the columns it names as parameters, or
# all of them if it takes **kwargs.


def _call_reward(fn, prompts: list[str], responses: list[str], columns: dict[str, list]) -> list[float]:
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
    """A trained reward model directory (an `alignkit rm` output) as a reward source: prompt text (as
    formatted for the policy) + response text (+ EOS where the response ended on one) is re-tokenized
    with the reward model's tokenizer and scored; its saved normalization (`reward_offset`) applies."""

    def __init__(self, directory: str, batch_size: int = 16, device=None):
        self.tokenizer = load_tokenizer(directory)
        self.rm, head_is_new = load_reward_model(directory)
        if head_is_new:
            raise ValueError(f"--reward_model {directory} is not a reward model (no trained score head); train one with `alignkit rm`")
        self.rm.requires_grad_(False)
        if device is not None:
            self.rm.to(device)
        self.batch_size = batch_size
        self.__name__ = f"reward_model:{directory}"

    def __call__(self, prompts: list[str], responses: list[str], finished: list[bool] | None = None, **columns) -> list[float]:
        eos = self.tokenizer.eos_token or ""
        ends = finished if finished is not None else [False] * len(responses)
        texts = [p + r + (eos if done else "") for p, r, done in zip(prompts, responses, ends)]
        sequences = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return score_sequences(self.rm, sequences, self.tokenizer.pad_token_id, self.batch_size)


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
            scores = _call_reward(fn, prompts, responses, columns)
            self.last_components[name] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        return total


def build_reward(reward_model: str = "", reward_fn: str = "", reward_weights: str = "", device=None) -> CompositeReward:
    """The PPO reward from flags: `reward_fn` is a comma-separated list of specs; `reward_weights` one
    weight per source, in the order reward model (if any) then functions (default: all 1)."""
    sources: list[tuple[str, object]] = []
    if reward_model:
        sources.append((f"reward_model", RewardModelScorer(reward_model, device=device)))
    for spec in [s.strip() for s in reward_fn.split(",") if s.strip()]:
        sources.append((spec, load_reward_function(spec)))
    weights = [float(w) for w in reward_weights.split(",") if w.strip()] if reward_weights else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"--reward_weights has {len(weights)} weight(s) for {len(sources)} reward source(s)")
    return CompositeReward([(name, fn, w) for (name, fn), w in zip(sources, weights)])
