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
left-padded prompts, position ids that skip padding). It keeps what PPO needs of the sampling policy
π_old, so no second pass over the episodes is needed: the log-prob of each sampled action (the
sampler's), and — read by a forward hook on the LM head at each decoding step — the entropy of
π_old(·|s_t) and V(s_t) from a value head on the same hidden state.

`policy_forward` recomputes all three with a teacher-forced pass over the same token sequences,
attention mask, position ids and temperature: the training forward. The two paths compute the same
functions of the same weights and differ only by float rounding (the KV-cache decode multiplies in
another order), ~1e-6 on CPU in float32, so before any update the PPO ratio π/π_old is 1 up to that.

`ActorCritic` is the module PPO trains (policy, value head or critic); its `forward` is the training
forward of a minibatch, the call that accelerate's DDP wrapper syncs gradients for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.generation import SamplingParams, generate
from alignkit.models import trunk_and_head, unwrap_base
from alignkit.packing import for_attention, pack_episodes, supports_custom_masks


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
    entropy: torch.Tensor | None = None  # [B, T] entropy of π(· | s_t) at sampling time (if recorded)
    values: torch.Tensor | None = None  # [B, T] V(s_t) from the value head at sampling time (if recorded)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def sequences(self):
        """(input_ids, attention_mask, position_ids) of prompt + response, as the sampler saw them."""
        from alignkit.generation import GenerationOutput

        return GenerationOutput(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask, self.logprobs, self.finished).sequences()

    def select(self, rows: torch.Tensor | list[int]) -> "Episodes":
        index = torch.as_tensor(rows, dtype=torch.long)
        take = lambda t: None if t is None else t[index.to(t.device)]
        return Episodes(
            take(self.prompt_ids), take(self.prompt_mask), take(self.response_ids), take(self.response_mask),
            take(self.logprobs), take(self.finished), [self.prompts[i] for i in index.tolist()], [self.responses[i] for i in index.tolist()],
            take(self.entropy), take(self.values),
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


class _StepRecorder:
    """Forward hook on the LM head while sampling. The head runs once per decoding step: on the prefill's
    last column (state s_0), then on each new column (s_1, s_2, ...). Its input is the last hidden state
    of s_t and its output the logits of π(·|s_t): from them it keeps V(s_t) (value head) and the entropy
    H_t = −Σ_a π(a|s_t) log π(a|s_t) of the temperature-scaled, unfiltered distribution."""

    def __init__(self, temperature: float, value_head: torch.nn.Module | None, entropy: bool):
        self.temperature, self.value_head, self.entropy = temperature, value_head, entropy
        self.values: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []

    def __call__(self, module, inputs, output) -> None:
        if self.value_head is not None:
            self.values.append(self.value_head(inputs[0][:, -1].float()).squeeze(-1).float())  # float32 under autocast too
        if self.entropy:
            log_probs = (output[:, -1].float() / self.temperature).log_softmax(-1)
            self.entropies.append(-(log_probs.exp() * log_probs).sum(-1))

    def stacked(self, records: list[torch.Tensor], steps: int, mask: torch.Tensor) -> torch.Tensor | None:
        if not records or len(records) != steps:  # the head did not run once per step: nothing exact to give
            return None
        return torch.stack(records, 1)[:, :steps] * mask.to(records[0].device).float()


def rollout(model, tokenizer, prompt_ids: list[list[int]], params: SamplingParams,
            value_head: torch.nn.Module | None = None, entropy: bool = False) -> Episodes:
    """Sample one episode per prompt (repeat a prompt for several samples).

    With `entropy` (and a `value_head`), also record H_t (and V(s_t)) during sampling; they stay None
    where the model cannot be hooked that way (no separate LM head), and the caller recomputes them."""
    trunk, head = trunk_and_head(model)
    recorder = _StepRecorder(1.0 if params.temperature <= 0 else float(params.temperature), value_head, entropy)
    hook = head.register_forward_hook(recorder) if head is not None and (entropy or value_head is not None) else None
    try:
        out = generate(model, tokenizer, prompt_ids, params)
    finally:
        if hook is not None:
            hook.remove()
    prompts = tokenizer.batch_decode([p for p in prompt_ids], skip_special_tokens=False)
    responses = [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(out.response_ids, out.response_mask)]
    steps = out.response_ids.shape[1]
    return Episodes(out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, out.logprobs, out.finished, prompts, responses,
                    recorder.stacked(recorder.entropies, steps, out.response_mask), recorder.stacked(recorder.values, steps, out.response_mask))


@dataclass
class PolicyOutputs:
    logprobs: torch.Tensor  # [B, T] log π(a_t | s_t), 0 where masked
    entropy: torch.Tensor | None  # [B, T] entropy of π(· | s_t)
    values: torch.Tensor | None  # [B, T] V(s_t) from the value head


def _state_hidden(trunk, model, episodes: Episodes, row_tokens: int) -> torch.Tensor:
    """[B, T, H] last hidden states of the states s_t, from a teacher-forced pass of `trunk` over the
    episodes: in prefix-shared rows (`packing.pack_episodes`) of about `row_tokens` columns (−1: the model's
    hidden size) when `row_tokens` ≠ 0 and the model's attention takes custom masks, else in the sampler's
    padded layout (column P − 1 + t holds s_t)."""
    device = next(model.parameters()).device
    if row_tokens < 0:  # auto: attention costs ~L·d per token in a row of L, the layers ~d²: keep L about d
        row_tokens = unwrap_base(model).config.hidden_size
    if row_tokens > 0 and supports_custom_masks(model):
        packed = pack_episodes(episodes.prompt_ids, episodes.prompt_mask, episodes.response_ids, episodes.response_mask, row_tokens, pad_id=0)
        hidden = trunk(input_ids=packed.input_ids.to(device), attention_mask=for_attention(packed.attention_mask.to(device), model),
                       position_ids=packed.position_ids.to(device), use_cache=False).last_hidden_state
        return hidden.flatten(0, 1)[packed.states.to(device)]
    input_ids, attention_mask, position_ids = episodes.sequences()
    hidden = trunk(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
                   use_cache=False).last_hidden_state
    width, steps = episodes.prompt_ids.shape[1], episodes.response_ids.shape[1]
    return hidden[:, width - 1 : width - 1 + steps]


def policy_forward(model, episodes: Episodes, temperature: float, value_head: torch.nn.Module | None = None,
                   entropy: bool = False, row_tokens: int = 0) -> PolicyOutputs:
    """Teacher-forced log-probs of the episodes' actions (and V(s_t) from `value_head` on the same hidden
    states): the hidden state of s_t unembedded gives π(· | s_t), which chose action a_t.

    Same position ids and logits / temperature as the sampler (temperature ≤ 0, i.e. greedy sampling,
    counts as 1); `row_tokens` ≠ 0 computes shared prompt prefixes once (`_state_hidden`)."""
    device = next(model.parameters()).device
    temperature = 1.0 if temperature <= 0 else float(temperature)
    trunk, head = trunk_and_head(model)
    if trunk is not None:
        states = _state_hidden(trunk, model, episodes, row_tokens)
        logits = head(states)
    else:
        input_ids, attention_mask, position_ids = episodes.sequences()
        width, steps = episodes.prompt_ids.shape[1], episodes.response_ids.shape[1]
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
                    use_cache=False, output_hidden_states=True)
        states = out.hidden_states[-1][:, width - 1 : width - 1 + steps]
        logits = out.logits[:, width - 1 : width - 1 + steps]
    mask = episodes.response_mask.to(device).float()
    log_probs = (logits.float() / temperature).log_softmax(-1)
    logp = log_probs.gather(-1, episodes.response_ids.to(device)[..., None]).squeeze(-1) * mask
    ent = -(log_probs.exp() * log_probs).sum(-1) * mask if entropy else None
    values = value_head(states.float()).squeeze(-1).float() * mask if value_head is not None else None  # float32 under autocast too
    return PolicyOutputs(logp, ent, values)


def critic_values(critic, episodes: Episodes, row_tokens: int = 0) -> torch.Tensor:
    """V(s_t) [B, T] from a separate critic: a `rewards.RewardModel` (a decoder with a scalar `score`
    head, e.g. initialised from a reward model) run over the same sequences; its head reads every
    state s_t instead of only the last token. The critic must share the policy's tokenizer."""
    base = critic.base
    hidden = _state_hidden(getattr(base, base.base_model_prefix), base, episodes, row_tokens)
    values = base.score(hidden).squeeze(-1).float()
    return values * episodes.response_mask.to(values.device).float()


class ActorCritic(torch.nn.Module):
    """The policy LM plus either a scalar value head on its last hidden state or a separate critic
    (`rewards.RewardModel`); neither for rloo/grpo."""

    def __init__(self, lm, value_head: torch.nn.Linear | None, critic=None):
        super().__init__()
        self.lm, self.value_head, self.critic = lm, value_head, critic

    def forward(self, episodes: Episodes, temperature: float, row_tokens: int, values: torch.Tensor | None = None,
                ptx_batch: dict | None = None) -> tuple[PolicyOutputs, torch.Tensor | None]:
        """The training forward of a minibatch: (log π(a_t|s_t) and V(s_t) of its episodes, the summed LM loss of
        `ptx_batch` or None). `values`: V(s_t) already computed with its graph (the critic's rollout pass), used
        instead of a critic forward. Under DDP every process calls this once per optimizer step, so the gradients
        of everything it touches are all-reduced in the backward."""
        out = policy_forward(self.lm, episodes, temperature, self.value_head, row_tokens=row_tokens)
        if self.critic is not None:
            out.values = values if values is not None else critic_values(self.critic, episodes, row_tokens)
        ptx_sum = None
        if ptx_batch is not None:
            from alignkit.train.sft import sft_loss

            ptx_sum, _ = sft_loss(self.lm, ptx_batch)
        return out, ptx_sum
