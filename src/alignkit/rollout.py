"""Text generation as a reinforcement-learning problem, and the rollouts PPO learns from.

The framing (one episode = one response to one prompt):

- state      s_t = (x, y_<t): the prompt tokens and the response tokens sampled so far
- action     a_t = y_t: the next token, from the whole vocabulary
- policy     π(a | s) = softmax(logits(s) / temperature)  (sampling may filter it with top_p/top_k;
             the log-probs PPO uses are always those of this *unfiltered* distribution)
- transition deterministic: s_{t+1} = s_t ⊕ a_t; the episode ends after a stop token (EOS) or after
             max_new_tokens actions (truncated: no EOS)
- reward     sparse: the score of the whole response at its last token, 0 elsewhere
             (`TextGenerationEnv.terminal_rewards`); the PPO trainer adds −β·KL(π‖π_ref) at every token.

`rollout` samples a batch of episodes with the KV-cache sampler (`alignkit.generation.generate`:
left-padded prompts, position ids that skip padding). `policy_forward` recomputes the log-probs of the
sampled actions with a teacher-forced pass over the same token sequences, the same attention mask,
position ids and temperature, so before any update the PPO ratio π/π_old is 1 (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.generation import SamplingParams, default_stop_token_ids, generate
from alignkit.models import trunk_and_head


@dataclass
class Episodes:
    """A batch of B episodes: prompts [B, P] (left-padded), actions [B, T] (right-padded)."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, T]: the actions a_0 … a_{T-1}
    response_mask: torch.Tensor  # [B, T]: 1 on actions taken (through the stop token)
    logprobs: torch.Tensor  # [B, T]: log π(a_t | s_t) at sampling time
    finished: torch.Tensor  # [B] bool: ended on a stop token
    prompts: list[str]  # decoded prompt text (as formatted for the model)
    responses: list[str]  # decoded response text, special tokens removed

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def sequences(self):
        """(input_ids, attention_mask, position_ids) of prompt + response, as the sampler saw them."""
        from alignkit.generation import GenerationOutput

        return GenerationOutput(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask, self.logprobs, self.finished).sequences()

    def select(self, rows: torch.Tensor | list[int]) -> "Episodes":
        index = torch.as_tensor(rows, dtype=torch.long)
        take = lambda t: t[index.to(t.device)]
        return Episodes(
            take(self.prompt_ids), take(self.prompt_mask), take(self.response_ids), take(self.response_mask),
            take(self.logprobs), take(self.finished), [self.prompts[i] for i in index.tolist()], [self.responses[i] for i in index.tolist()],
        )


@dataclass
class TextGenerationEnv:
    """The environment of the framing above: deterministic token-appending transitions, episodes that end
    at a stop token or at max_new_tokens, and a sparse terminal reward. The sampler
    (`generation.generate`) runs the transitions for a whole batch at once; this class states them."""

    stop_token_ids: tuple[int, ...]
    max_new_tokens: int

    def step(self, state: list[int], action: int, steps_taken: int) -> tuple[list[int], bool]:
        """s_{t+1} = s_t ⊕ a_t, and whether the episode is over."""
        return state + [action], action in self.stop_token_ids or steps_taken + 1 >= self.max_new_tokens

    @staticmethod
    def terminal_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] rewards: scores[b] at row b's last action, 0 elsewhere."""
        rewards = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
        last = (response_mask.sum(1) - 1).clamp(min=0).long()
        rewards[torch.arange(len(scores), device=rewards.device), last] = scores.to(rewards)
        return rewards * response_mask


def rollout(model, tokenizer, prompt_ids: list[list[int]], params: SamplingParams) -> Episodes:
    """Sample one episode per prompt (repeat a prompt for several samples)."""
    out = generate(model, tokenizer, prompt_ids, params)
    prompts = tokenizer.batch_decode([p for p in prompt_ids], skip_special_tokens=False)
    responses = [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(out.response_ids, out.response_mask)]
    return Episodes(out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, out.logprobs, out.finished, prompts, responses)


def make_env(model, tokenizer, params: SamplingParams) -> TextGenerationEnv:
    stop = params.stop_token_ids if params.stop_token_ids is not None else default_stop_token_ids(model, tokenizer)
    return TextGenerationEnv(tuple(stop), params.max_new_tokens)


@dataclass
class PolicyOutputs:
    logprobs: torch.Tensor  # [B, T] log π(a_t | s_t), 0 where masked
    entropy: torch.Tensor | None  # [B, T] entropy of π(· | s_t)
    values: torch.Tensor | None  # [B, T] V(s_t) from the value head


def policy_forward(model, episodes: Episodes, temperature: float, value_head: torch.nn.Module | None = None,
                   entropy: bool = False) -> PolicyOutputs:
    """Teacher-forced log-probs of the episodes' actions (and V(s_t) from `value_head` on the same hidden
    states): hidden state at column P − 1 + t is the state s_t that chose action a_t.

    Uses the attention mask and position ids of `Episodes.sequences()` and logits / temperature
    (temperature ≤ 0, i.e. greedy sampling, counts as 1, as in the sampler)."""
    input_ids, attention_mask, position_ids = episodes.sequences()
    device = next(model.parameters()).device
    input_ids, attention_mask, position_ids = input_ids.to(device), attention_mask.to(device), position_ids.to(device)
    width, steps = episodes.prompt_ids.shape[1], episodes.response_ids.shape[1]
    temperature = 1.0 if temperature <= 0 else float(temperature)
    trunk, head = trunk_and_head(model)
    if trunk is not None:
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        states = hidden[:, width - 1 : width - 1 + steps]
        logits = head(states)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, output_hidden_states=True)
        states = out.hidden_states[-1][:, width - 1 : width - 1 + steps]
        logits = out.logits[:, width - 1 : width - 1 + steps]
    mask = episodes.response_mask.to(device).float()
    log_probs = (logits.float() / temperature).log_softmax(-1)
    logp = log_probs.gather(-1, episodes.response_ids.to(device)[..., None]).squeeze(-1) * mask
    ent = -(log_probs.exp() * log_probs).sum(-1) * mask if entropy else None
    values = value_head(states.float()).squeeze(-1) * mask if value_head is not None else None
    return PolicyOutputs(logp, ent, values)


def critic_values(critic, episodes: Episodes) -> torch.Tensor:
    """V(s_t) [B, T] from a separate critic: a `rewards.RewardModel` (a decoder with a scalar `score`
    head, e.g. initialised from a reward model) run over the same sequences; its head reads every
    state s_t (column P − 1 + t) instead of only the last token. The critic must share the policy's
    tokenizer."""
    input_ids, attention_mask, position_ids = episodes.sequences()
    base = critic.base
    device = next(critic.parameters()).device
    trunk = getattr(base, base.base_model_prefix)
    hidden = trunk(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
                   use_cache=False).last_hidden_state
    width, steps = episodes.prompt_ids.shape[1], episodes.response_ids.shape[1]
    values = base.score(hidden[:, width - 1 : width - 1 + steps]).squeeze(-1).float()
    return values * episodes.response_mask.to(device).float()
