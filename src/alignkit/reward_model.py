"""Reward models: a language model whose unembedding is replaced by a scalar head; loading, scoring, normalization.

A reward model is saved as a plain `AutoModelForSequenceClassification` directory (num_labels=1), so any
tool can load it. alignkit reads the reward itself (`RewardModel.forward`) instead of calling that
class's forward, which finds the last token as the last one that is not the pad id: when pad == eos
(the usual choice) and a response ends with eos, it would read the token before it.

Normalization (`alignkit rm --normalize_dataset`) shifts rewards by a constant: into the head's bias
where the head has one (BERT-style encoders), else into `config.reward_offset`, which `RewardModel`
adds (decoder heads, e.g. Llama's `score`, have no bias). `config.reward_mean`/`reward_std` record
the statistics that were measured.

The reward *sources* PPO trains against (this model among them) are in `rl/rewards.py`; `alignkit score`
(a data file through the model) is in `evaluate/score.py`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from alignkit import atomic
from alignkit.models import _explained, load_causal_lm, resolve_model_path, unwrap_base
from alignkit.progress import progress_bar


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
    `row_tokens` tokens (−1: the model's hidden size; see `rl.rollout._state_hidden`)."""
    from alignkit.data.tokenize import pad_right
    from alignkit.packing import pack_sequences, supports_custom_masks

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



def training_formatting(reward_model_dir: str):
    """The prompt formatting the reward model was trained with (its config.yaml), else the defaults."""
    import yaml

    from alignkit.data.tokenize import Formatting

    saved = Path(resolve_model_path(reward_model_dir), "config.yaml")
    cfg = yaml.safe_load(saved.read_text()) if saved.exists() else {}
    return Formatting(cfg.get("use_chat_template", "auto"), cfg.get("separator", Formatting.separator))



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
