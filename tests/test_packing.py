"""Prefix-shared rows: the tree mask against its definition, and PPO's teacher-forced pass in shared
rows equal to the padded layout in values and gradients."""

import pytest
import torch

from alignkit.packing import pack_episodes, tree_mask
from alignkit.rl.rollout import Episodes, critic_values, policy_forward


def test_tree_mask_matches_its_definition():
    # row 0: root 0 → 1 → {2, 3}, 4 a second child of 0; row 1: a chain 0 → 1 → 2, then padding
    segment = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 4], [0, 1, 1, 2, 2, -1, -1, -1]])
    parent = torch.tensor([[-1, 0, 1, 1, 0], [-1, 0, 1, -1, -1]])
    got = tree_mask(segment, parent)[:, 0]

    def ancestors(b, s):
        chain = {s}
        while parent[b, s] >= 0:
            s = int(parent[b, s])
            chain.add(s)
        return chain

    for b in range(2):
        for i in range(8):
            for j in range(8):
                si, sj = int(segment[b, i]), int(segment[b, j])
                if si < 0:
                    expected = sj < 0 and j <= i
                else:
                    expected = j <= i and sj >= 0 and sj in ancestors(b, si)
                assert bool(got[b, i, j]) == expected, (b, i, j)


def _episodes(tokenizer, prompts: list[str], responses: list[list[int]]) -> Episodes:
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width, steps = max(map(len, ids)), max(map(len, responses))
    prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    response_ids = torch.tensor([r + [0] * (steps - len(r)) for r in responses])
    response_mask = torch.tensor([[1] * len(r) + [0] * (steps - len(r)) for r in responses])
    n = len(prompts)
    return Episodes(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(n, steps), torch.zeros(n, dtype=torch.bool),
                    prompts, [""] * n)


SYSTEM = "System: you are a careful assistant. User: "
PROMPTS = [SYSTEM + "tell me a story", SYSTEM + "tell me a story", SYSTEM + "why is the sky blue?", SYSTEM, SYSTEM + "hi"]
RESPONSES = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17], [18, 19, 20]]


@pytest.mark.parametrize("row_tokens", [1, 24, 4096])
def test_shared_rows_give_the_padded_layouts_logprobs_values_and_gradients(tiny_model_dir, tokenizer, row_tokens):
    """Duplicate prompts (k samples), a prompt equal to the common prefix, a one-token response, and row
    budgets from one episode per row to all in one row."""
    from alignkit.models import load_causal_lm

    episodes = _episodes(tokenizer, PROMPTS, RESPONSES)
    model = load_causal_lm(str(tiny_model_dir))
    head = torch.nn.Linear(model.config.hidden_size, 1)
    results = []
    for tokens in (0, row_tokens):
        model.zero_grad(set_to_none=True)
        out = policy_forward(model, episodes, 0.8, value_head=head, entropy=True, row_tokens=tokens)
        (out.logprobs.sum() + out.values.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.logprobs.detach(), out.entropy.detach(), out.values.detach(), grads))
    mask = episodes.response_mask.bool()
    for padded, shared in zip(results[0], results[1]):
        assert padded.shape == shared.shape
        assert torch.allclose(padded, shared, atol=2e-5, rtol=1e-4)
    assert (results[1][0][mask] < 0).all() and (results[1][0][~mask] == 0).all()


def test_shared_rows_hold_fewer_tokens_and_respect_the_budget(tokenizer):
    episodes = _episodes(tokenizer, PROMPTS, RESPONSES)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    common = next(i for i in range(min(map(len, ids)) + 1) if i == min(map(len, ids)) or len({tuple(p[: i + 1]) for p in ids}) > 1)
    assert common >= 8
    packed = pack_episodes(episodes.prompt_ids, episodes.prompt_mask, episodes.response_ids, episodes.response_mask, 4096, 0)
    # one row: the common prefix once, each distinct prompt's rest once (the two "story" samples share
    # theirs), each response without its last token
    assert packed.input_ids.shape == (1, common + sum(len(ids[i]) - common for i in (0, 2, 3, 4)) + sum(len(r) - 1 for r in RESPONSES))
    padded = sum(map(len, ids)) + sum(map(len, RESPONSES))
    assert packed.input_ids.shape[1] < padded - 2 * common
    # a small budget: more rows, each within it unless one episode alone is longer
    small = pack_episodes(episodes.prompt_ids, episodes.prompt_mask, episodes.response_ids, episodes.response_mask, 24, 0)
    longest = max(len(p) + len(r) - 1 for p, r in zip(ids, RESPONSES))
    assert small.input_ids.shape[0] > 1 and small.input_ids.shape[1] <= max(24, longest)
    # the state of action t is the column holding the prompt's last token (t = 0) or action t − 1
    for layout in (packed, small):
        flat = layout.input_ids.flatten()
        for b, (p, r) in enumerate(zip(ids, RESPONSES)):
            assert flat[layout.states[b, : len(r)]].tolist() == [p[-1]] + r[:-1]


def test_critic_in_shared_rows(tiny_model_dir, tokenizer, tmp_path):
    from alignkit.reward_model import load_reward_model

    critic, _ = load_reward_model(str(tiny_model_dir))
    episodes = _episodes(tokenizer, PROMPTS, RESPONSES)
    padded, shared = critic_values(critic, episodes), critic_values(critic, episodes, row_tokens=4096)
    assert torch.allclose(padded, shared, atol=2e-5) and (shared[~episodes.response_mask.bool()] == 0).all()


def test_reward_model_scores_in_shared_rows(tiny_model_dir, tokenizer):
    from alignkit.reward_model import init_head, load_reward_model, score_sequences

    rm, _ = load_reward_model(str(tiny_model_dir))
    init_head(rm.model, seed=0)
    sequences = [tokenizer(p + " and so on" * (i % 3), add_special_tokens=False)["input_ids"] for i, p in enumerate(PROMPTS * 2)]
    pad = tokenizer.pad_token_id
    padded = torch.tensor(score_sequences(rm, sequences, pad, batch_size=4, row_tokens=0))
    for row_tokens in (8, 512):
        shared = torch.tensor(score_sequences(rm, sequences, pad, batch_size=4, row_tokens=row_tokens))
        assert torch.allclose(padded, shared, atol=2e-5)
    assert padded.std() > 0


def test_eager_attention_takes_the_mask_as_scores(tiny_model_dir, tokenizer):
    """Eager attention adds the mask to the scores: the boolean mask is turned into 0 / −large."""
    from alignkit.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    episodes = _episodes(tokenizer, PROMPTS, RESPONSES)
    with torch.no_grad():
        padded, shared = (policy_forward(model, episodes, 1.0, row_tokens=n).logprobs for n in (0, 4096))
    assert torch.allclose(padded, shared, atol=2e-5)


def test_rows_do_not_depend_on_the_episode_order(tokenizer):
    """PPO's minibatches are permutations: the same episodes must give the same rows, so the forward is
    the same bit for bit."""
    episodes = _episodes(tokenizer, PROMPTS, RESPONSES)
    order = [3, 0, 4, 2, 1]
    shuffled = episodes.select(order)
    a = pack_episodes(episodes.prompt_ids, episodes.prompt_mask, episodes.response_ids, episodes.response_mask, 24, 0)
    b = pack_episodes(shuffled.prompt_ids, shuffled.prompt_mask, shuffled.response_ids, shuffled.response_mask, 24, 0)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.states[order], b.states)
