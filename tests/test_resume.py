"""Exact resume with real kills: every trainer, SIGKILLed at a step and resumed with `latest`, ends with the
same weights and metrics rows as an uninterrupted run.

Each case runs the trainer three times on tiny models: uninterrupted (in this process); with
--save_steps 1 in a forked child that the loop's test hook SIGKILLs (ALIGNKIT_KILL_AT_STEP=N: after step
N's update and metrics row, before its checkpoint, so step N is lost and redone; ALIGNKIT_KILL_IN_SAVE=N:
halfway through writing checkpoint N); then resumed here with --resume_from_checkpoint latest. The kill
step is drawn from a generator seeded with the case's name (random, but the same on every machine).

Equality is exact: the killed and resumed runs do the same float operations in the same order on the
same machine as the uninterrupted one (one thread, see `one_thread`; the child is a fork), and everything carried
across the kill (weights, Adam moments, RNG states, unlogged metric sums) is stored bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import traceback
from pathlib import Path

import pytest
import torch

from alignkit.config import DPOConfig, PPOConfig, RMConfig, SFTConfig
from alignkit.data import tasks
from alignkit.data.formats import write_jsonl

TIMING = ("tokens_per_second", "training_tokens_per_second", "generation_tokens_per_second")

REWARD = "def words(prompts, responses, **columns):\n    return [float(len(r.split())) for r in responses]\n"


@pytest.fixture(autouse=True)
def one_thread():
    """The killed run is a fork of this process. OpenMP's thread pool does not survive a fork (the child hangs
    in its first parallel region unless it runs one thread), and another thread count would change float
    rounding: so all three runs of a case use one thread, whatever the suite runs with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-data")
    rows = tasks.make_mixture(["reversal", "arithmetic"], "train", 6, seed=1)
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], root / "sft.jsonl")
    write_jsonl([{"prompt": r["prompt"]} for r in rows], root / "prompts.jsonl")
    pairs = tasks.make_preferences("arithmetic", "train", 12, seed=3)
    write_jsonl([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs], root / "prefs.jsonl")
    (root / "reward.py").write_text(REWARD)
    return root


def run(kind: str, settings: dict) -> None:
    if kind == "sft":
        from alignkit.train.sft import run_sft

        run_sft(SFTConfig(**settings))
    elif kind == "rm":
        from alignkit.train.rm import run_rm

        run_rm(RMConfig(**settings))
    elif kind == "dpo":
        from alignkit.train.dpo import run_dpo

        run_dpo(DPOConfig(**settings))
    else:
        from alignkit.rl.ppo import run_ppo

        run_ppo(PPOConfig(**settings))


def run_killed(kind: str, settings: dict, variable: str, step: int) -> None:
    """Run in a forked child whose loop SIGKILLs itself at `step`; the child must die of that signal."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            os.environ[variable] = str(step)
            run(kind, settings)
        except BaseException:
            traceback.print_exc()
            code = 4
        os._exit(code)  # reached only when the hook did not fire
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with status {status}, not SIGKILL"


def metrics(output_dir: Path) -> list[str]:
    """The rows as canonical JSON (so NaN equals NaN), without wall-clock fields."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING and not k.startswith("seconds/")}, sort_keys=True) for r in rows]


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(output_dir.rglob("*.safetensors")):
        if "checkpoints" not in path.parts:
            tensors.update({f"{path.relative_to(output_dir)}:{k}": v for k, v in load_file(str(path)).items()})
    return tensors


def check_exact_resume(kind: str, settings: dict, tmp_path: Path, kills: list[tuple[str, int]]) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(kind, {**settings, "output_dir": str(full)})
    for variable, step in kills:
        resume = "latest" if (cut / "config.yaml").exists() else ""
        run_killed(kind, {**settings, "output_dir": str(cut), "save_steps": 1, "resume_from_checkpoint": resume}, variable, step)
    run(kind, {**settings, "output_dir": str(cut), "save_steps": 1, "resume_from_checkpoint": "latest"})
    assert metrics(cut) == metrics(full)
    expected, got = weights(full), weights(cut)
    assert expected.keys() == got.keys() and len(expected) > 0
    changed = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not changed, f"{kind}: {len(changed)} tensors differ after resume, e.g. {changed[:3]}"
    # --save_total_limit (default 2) kept the two newest checkpoints; no temporary file or folder of a killed write is left
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == [f"step-{settings['max_steps'] - 1}", f"step-{settings['max_steps']}"]
    assert not [p for p in cut.rglob("*") if ".tmp-" in p.name]


def kill_step(name: str, max_steps: int) -> int:
    return random.Random(name).randint(1, max_steps - 1)


def common(model_dir, **settings) -> dict:
    return {"model_name_or_path": str(model_dir), "progress": False, "max_length": 128, "learning_rate": 1e-3, "logging_steps": 1, **settings}


def test_sft_resumes_exactly_after_a_kill_and_a_kill_during_a_save(tiny_model_dir, data, tmp_path):
    """Two kills in one run: after step 4 (before its checkpoint: resumed from step 3's), then in the middle
    of writing checkpoint 5 (step 4's stays the latest). With logging_steps 2 the row of step 4 averages
    steps 3 and 4, which straddle the first kill: step 3's unlogged sums must survive it."""
    settings = common(tiny_model_dir, dataset=str(data / "sft.jsonl"), max_steps=6, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, logging_steps=2, eval_dataset=str(data / "sft.jsonl"), eval_steps=3)
    check_exact_resume("sft", settings, tmp_path, [("ALIGNKIT_KILL_AT_STEP", 4), ("ALIGNKIT_KILL_IN_SAVE", 5)])


def test_rm_resumes_exactly(tiny_model_dir, data, tmp_path):
    settings = common(tiny_model_dir, dataset=str(data / "prefs.jsonl"), max_steps=4, per_device_train_batch_size=3)
    check_exact_resume("rm", settings, tmp_path, [("ALIGNKIT_KILL_AT_STEP", kill_step("rm", 4))])


def test_dpo_resumes_exactly(tiny_model_dir, data, tmp_path):
    settings = common(tiny_model_dir, dataset=str(data / "prefs.jsonl"), max_steps=4, per_device_train_batch_size=3, learning_rate=1e-3)
    check_exact_resume("dpo", settings, tmp_path, [("ALIGNKIT_KILL_AT_STEP", kill_step("dpo", 4))])


def ppo(model_dir, data, **settings) -> dict:
    return common(model_dir, **{"dataset": str(data / "prompts.jsonl"), "reward_fn": f"{data / 'reward.py'}:words", "max_steps": 4,
                                "rollout_batch_size": 4, "mini_batch_size": 2, "num_ppo_epochs": 2, "max_new_tokens": 4,
                                "lr_scheduler_type": "linear", **settings})


@pytest.mark.parametrize("name,extra", [
    ("value_head_ptx", {"ptx_coef": 0.5, "ptx_dataset": "sft.jsonl"}),
    ("critic", {"critic_model": "MODEL"}),
    ("rloo", {"advantage_estimator": "rloo", "num_samples_per_prompt": 2, "rollout_batch_size": 2}),
    ("adaptive_kl", {"kl_target": 0.01, "kl_horizon": 10.0, "kl_coef": 0.2}),
])
def test_ppo_resumes_exactly(name, extra, tiny_model_dir, data, tmp_path):
    """PPO with a value head (and a ptx stream), a separate critic, RLOO, and adaptive KL (β moves every
    iteration: kl_horizon 10 responses, target 0.01): the sampling seeds, β, the data and ptx positions,
    optimizer and scheduler all come back."""
    extra = {k: str(data / v) if k == "ptx_dataset" else str(tiny_model_dir) if v == "MODEL" else v for k, v in extra.items()}
    check_exact_resume("ppo", ppo(tiny_model_dir, data, **extra), tmp_path, [("ALIGNKIT_KILL_AT_STEP", kill_step(name, 4))])
