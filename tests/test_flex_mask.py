"""--attention_kernel flex: the tree mask of prefix-shared rows as a FlexAttention BlockMask.

The dense 4-D mask (`packing.tree_mask`) is the reference: the block mask's mask_mod, evaluated on the full grid,
must equal it element for element for reward-model, DPO and PPO rows; its block map must keep every block that
holds an allowed pair; attention, log-probs and losses through FlexAttention (eager on CPU, fp32) must equal
the dense path's within the rounding of the computation. FlexAttention has no backward on CPU, so every
comparison here runs forward; training with flex is refused on a machine without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit import attention
from alignkit.packing import for_attention, pack_episodes, pack_sequences

flex = pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
EPS = torch.finfo(torch.float32).eps


def random_ids(generator, n: int, vocab: int = 1000) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=generator).tolist()


def rm_rows(seed: int = 0):
    """Reward-model rows (`train.rm.collate`): prompts of 3..40 tokens with 2..4 responses of 1..30, right-padded."""
    from alignkit.data.preferences import TokenizedPreference
    from alignkit.train import rm

    g = torch.Generator().manual_seed(seed)
    examples = []
    for prompt_length, k in [(3, 2), (40, 4), (17, 3), (9, 2)]:
        responses = [random_ids(g, int(torch.randint(1, 31, (1,), generator=g))) for _ in range(k)]
        examples.append(TokenizedPreference(random_ids(g, prompt_length), responses, [(0, j) for j in range(1, k)]))
    return rm.collate(examples, pad_id=0, shared=True)


def dpo_rows(seed: int = 0, lengths=((5, 7, 2), (31, 1, 12), (12, 20, 20), (1, 3, 9))):
    """DPO rows (`train.dpo.collate`): prompt + chosen + rejected of the given lengths, right-padded."""
    from alignkit.train import dpo

    g = torch.Generator().manual_seed(seed)
    pairs = [dpo.DPOPair(random_ids(g, p), random_ids(g, c), random_ids(g, r)) for p, c, r in lengths]
    return dpo.collate(pairs, pad_id=0, shared=True)


def ppo_rows(seed: int = 0, row_tokens: int = 64):
    """PPO rows (`packing.pack_episodes`): 3 distinct prompts sharing a 6-token prefix, 2 or 3 episodes each,
    responses of 1..12 actions; several rows of about `row_tokens` columns."""
    g = torch.Generator().manual_seed(seed)
    common = random_ids(g, 6)
    prompts = [common + random_ids(g, n) for n in (4, 11, 0)]
    episodes = [p for p, k in zip(prompts, (3, 2, 3)) for _ in range(k)]
    width, steps = max(map(len, episodes)), 12
    prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in episodes])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in episodes])
    lengths = torch.randint(1, steps + 1, (len(episodes),), generator=g)
    response_mask = (torch.arange(steps)[None] < lengths[:, None]).long()
    response_ids = torch.randint(3, 1000, (len(episodes), steps), generator=g) * response_mask
    packed = pack_episodes(prompt_ids, prompt_mask, response_ids, response_mask, row_tokens, pad_id=0)
    return {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask, "position_ids": packed.position_ids}


def long_rows():
    """Rows of 200..400 tokens, so that the block map (128 x 128 blocks) has empty, full and partial blocks."""
    return dpo_rows(1, lengths=((150, 100, 120), (40, 160, 200), (260, 5, 3)))


LAYOUTS = {"rm": rm_rows, "dpo": dpo_rows, "ppo": ppo_rows, "ppo-one-row": lambda: ppo_rows(row_tokens=10_000),
           "long": long_rows, "scored": lambda: {"attention_mask": pack_sequences([[5, 6, 7], [5, 6, 8, 9], [5, 1], [4]], 100).attention_mask}}


def materialized(block_mask) -> torch.Tensor:
    """The block mask's mask_mod evaluated on every (query, key) pair of its shape: [B, 1, L, L]."""
    batch, _, q_len, kv_len = block_mask.shape
    return flex.create_mask(block_mask.mask_mod, batch, 1, q_len, kv_len, device="cpu")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_mask_is_the_dense_tree_mask(layout):
    dense = LAYOUTS[layout]()["attention_mask"]
    assert dense.dtype == torch.bool and dense.dim() == 4
    group, visible = attention.tree_ids(dense)
    assert torch.equal(attention.mask_from_ids(group, visible), dense)  # the ids path is taken, not the fallback
    assert visible.shape[1] < dense.shape[-1] / 2  # segments: a few per row, not one per token
    block_mask = attention.tree_block_mask(dense)
    assert torch.equal(materialized(block_mask), dense)


def test_block_map_keeps_every_block_with_an_allowed_pair_and_skips_the_rest():
    dense = long_rows()["attention_mask"]
    block_mask = attention.tree_block_mask(dense)
    width = dense.shape[-1]
    blocks = -(-width // attention.BLOCK)
    padded = torch.nn.functional.pad(dense[:, 0], (0, blocks * attention.BLOCK - width, 0, blocks * attention.BLOCK - width))
    any_allowed = padded.view(len(dense), blocks, attention.BLOCK, blocks, attention.BLOCK).any(4).any(2)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), any_allowed)
    assert not any_allowed.all()  # the layout does have blocks to skip: the test can tell a full map from a right one


def test_a_mask_that_is_no_tree_falls_back_to_reading_the_dense_mask():
    g = torch.Generator().manual_seed(0)
    dense = (torch.rand(2, 1, 50, 50, generator=g) < 0.5) | torch.eye(50, dtype=torch.bool)  # every query sees itself
    group, visible = attention.tree_ids(dense)
    assert not torch.equal(attention.mask_from_ids(group, visible), dense)
    assert torch.equal(materialized(attention.tree_block_mask(dense)), dense)


def attention_bound(query, key, value, width: int) -> float:
    """Rounding bound of fp32 softmax(q·kᵀ/√d)·v computed in two summation orders: each score carries ≤ d·eps·|q||k|/√d,
    a softmax weight moves by ≤ 2·max|Δscore| relative, and the weighted sum of ≤ L values adds L·eps·max|v|;
    doubled for the two sides and again as margin."""
    scale = query.shape[-1] ** -0.5
    qk = query.norm(dim=-1).max() * key.norm(dim=-1).max() * scale
    return float(4 * EPS * value.abs().max() * (2 * query.shape[-1] * qk + width))


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 2)])  # MHA, grouped, grouped with 6 heads (kv repeated)
def test_flex_attention_equals_sdpa_with_the_dense_mask(heads, kv_heads):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dense = ppo_rows()["attention_mask"]
    batch, width, dim = dense.shape[0], dense.shape[-1], 16
    g = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, width, dim, generator=g)
    key, value = torch.randn(2, batch, kv_heads, width, dim, generator=g)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    module.eval()
    scaling = dim**-0.5
    expected, _ = sdpa_attention_forward(module, query, key, value, dense, scaling=scaling)
    got, _ = attention.tree_flex_attention(module, query, key, value, attention.tree_block_mask(dense), scaling=scaling)
    assert got.shape == expected.shape == (batch, width, heads, dim)
    assert (got - expected).abs().max() <= attention_bound(query, key, value, width)
    # and the same function with a non-block mask is SDPA itself
    same, _ = attention.tree_flex_attention(module, query, key, value, dense, scaling=scaling)
    assert torch.equal(same, expected)


@pytest.fixture(scope="module")
def tokenizer_pad(tiny_model_dir):
    from alignkit.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir)).pad_token_id


def flex_copy(model):
    """The model switched to the flex kernel (as `--attention_kernel flex` does: `resolve` keeps flex as asked)."""
    assert attention.use_attention_kernel(model, "flex") == "flex"
    return model


def model_bound(values: torch.Tensor, tokens, width: int) -> torch.Tensor:
    """Tolerance for a sum over `tokens` per-token log-probs (or one reward: tokens = 1) of the tiny model, rows of
    `width` columns: attention's rounding is ≤ ~width·eps relative to its inputs (`attention_bound`); the 2 normalized
    layers carry it with O(1) gain, into each token's |value| + 1: 2 layers x 2 sides gives 4·width·eps·(|value| + tokens)."""
    return 4 * width * EPS * (values.abs() + tokens)


def test_dpo_log_probs_and_loss_with_flex_equal_dense(tiny_model_dir):
    from alignkit.config import DPOConfig
    from alignkit.models import load_causal_lm
    from alignkit.train import dpo

    batch = dpo_rows()
    dense_model = load_causal_lm(str(tiny_model_dir)).eval()
    flex_model = flex_copy(load_causal_lm(str(tiny_model_dir)).eval())
    assert isinstance(for_attention(batch["attention_mask"], flex_model), flex.BlockMask)
    assert for_attention(batch["attention_mask"], dense_model) is batch["attention_mask"]
    with torch.no_grad():
        expected, lengths = dpo.sequence_logps(dense_model, batch)
        got, _ = dpo.sequence_logps(flex_model, batch)
        cfg = DPOConfig(dataset="x", beta=0.1)
        reference = dpo.frozen_reference(load_causal_lm(str(tiny_model_dir), torch.float32))  # a dense reference beside a flex policy
        loss_dense, _ = dpo.dpo_loss(dense_model, batch, cfg, reference)
        loss_flex, _ = dpo.dpo_loss(flex_model, batch, cfg, reference)
    bound = model_bound(expected, lengths, batch["input_ids"].shape[1])
    assert (got - expected).abs().le(bound).all(), (got - expected).abs().max()
    assert loss_dense.item() == pytest.approx(math.log(2) * (len(lengths) // 2), rel=1e-6)  # policy == reference: every pair log 2
    # the loss is Σ −log σ(β·(Δπ − Δref)), 1-Lipschitz in its argument: it moves by ≤ β·Σ|Δ log-probs|
    assert abs(loss_flex - loss_dense) <= 0.1 * bound.sum()


def test_reward_model_loss_with_flex_equals_dense(tiny_model_dir):
    from alignkit.reward_model import init_head, load_reward_model
    from alignkit.train import rm

    batch = rm_rows()
    models = []
    for kernel in ("dense", "flex"):
        model, _ = load_reward_model(str(tiny_model_dir))
        init_head(model.model, seed=0)
        assert attention.use_attention_kernel(model, kernel) == kernel  # the wrapper: the transformers model inside switches
        models.append(model.eval())
    assert models[1].base.config._attn_implementation == attention.TREE_FLEX
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "last")}
        expected, got = models[0](**inputs), models[1](**inputs)
        (loss_dense, _), (loss_flex, _) = rm.rm_loss(models[0], batch), rm.rm_loss(models[1], batch)
    bound = model_bound(expected, 1, batch["input_ids"].shape[1])
    assert (got - expected).abs().le(bound).all(), (got - expected).abs().max()
    assert abs(loss_flex - loss_dense) <= bound.sum()  # −log σ(r_w − r_l) is 1-Lipschitz in each reward
    assert abs(loss_dense) > 0.1  # a real loss, not a degenerate 0 = 0


def test_flex_keeps_plain_padded_batches_on_sdpa(tiny_model_dir):
    """Generation and unshared batches (2-D masks) are unchanged by the flex kernel: bit for bit the SDPA result."""
    from alignkit.models import load_causal_lm

    dense_model = load_causal_lm(str(tiny_model_dir)).eval()
    flex_model = flex_copy(load_causal_lm(str(tiny_model_dir)).eval())
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(flex_model(input_ids=input_ids, attention_mask=mask).logits, dense_model(input_ids=input_ids, attention_mask=mask).logits)


def test_kernel_choice(monkeypatch, tiny_model_dir):
    from alignkit.models import load_causal_lm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.resolve("auto") == "dense" and attention.resolve("dense") == "dense"
    model = load_causal_lm(str(tiny_model_dir))
    assert attention.use_attention_kernel(model, "auto") == "dense" and model.config._attn_implementation == "sdpa"
    assert "CUDA" in attention.flex_refusal("flex") and attention.flex_refusal("auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.resolve("auto") == "flex" and attention.flex_refusal("flex") is None


@pytest.mark.parametrize("command", ["rm", "dpo", "ppo"])
def test_flex_without_a_gpu_is_refused_before_anything_loads(command, monkeypatch):
    from typer.testing import CliRunner

    from alignkit import models
    from alignkit.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("load_causal_lm", "load_tokenizer", "resolve_model_path"):
        monkeypatch.setattr(models, name, lambda *a, **k: pytest.fail("a model was loaded before --attention_kernel was checked"))
    dataset = ["--dataset", "builtin_pref:comparison:4"] if command != "ppo" else ["--dataset", "builtin:arithmetic", "--reward_fn", "builtin:exact_match"]
    result = CliRunner().invoke(app, [command, "--model_name_or_path", "no/such-model", *dataset, "--attention_kernel", "flex"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --attention_kernel: flex needs a CUDA GPU") and "Traceback" not in result.output


def test_sft_has_no_prefix_shared_rows_so_no_attention_kernel_flag():
    """A command shows and accepts only the flags it uses: SFT never builds a tree mask."""
    from typer.testing import CliRunner

    from alignkit.cli import app

    result = CliRunner().invoke(app, ["sft", "--dataset", "builtin:arithmetic", "--attention_kernel", "dense"])
    assert result.exit_code == 2 and "--attention_kernel" in result.output and "Traceback" not in result.output, result.output
    assert "--attention_kernel" not in CliRunner().invoke(app, ["sft", "-h"]).output
    assert "--attention_kernel" in CliRunner().invoke(app, ["rm", "-h"]).output


def test_training_passes_the_flag_to_the_model(tmp_path, tiny_model_dir, monkeypatch):
    """`run_rm --attention_kernel flex` trains through the block-mask path (FlexAttention swapped for a dense
    evaluation of the same block mask, which has a backward on CPU) and logs the dense run's loss."""
    import json

    from alignkit.config import RMConfig
    from alignkit.data import tasks
    from alignkit.data.formats import write_jsonl
    from alignkit.train import loop, rm

    calls = []

    def flex_on_cpu(query, key, value, block_mask, scale, enable_gqa):
        calls.append(block_mask.shape)
        batch, _, q_len, kv_len = block_mask.shape
        mask = flex.create_mask(block_mask.mask_mod, batch, 1, q_len, kv_len, device=query.device)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)

    monkeypatch.setattr(attention, "_flex_kernel", lambda device_type: flex_on_cpu)
    monkeypatch.setattr(loop, "flex_refusal", lambda kernel: None)
    data = tmp_path / "pairs.jsonl"
    write_jsonl([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in tasks.make_preferences("arithmetic", "train", 6, seed=0)], data)
    losses = {}
    for kernel in ("dense", "flex"):
        out = tmp_path / kernel
        rm.run_rm(RMConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(out), max_steps=2,
                           per_device_train_batch_size=3, learning_rate=1e-3, logging_steps=1, progress=False, attention_kernel=kernel))
        losses[kernel] = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
        assert bool(calls) == (kernel == "flex")  # flex ran (2 layers x 2 steps), dense did not touch it
    assert len(calls) == 4
    assert losses["flex"] == pytest.approx(losses["dense"], rel=1e-5, abs=1e-6)
