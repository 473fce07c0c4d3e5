"""A run's output directory, its checkpoints and exact resume — shared by every trainer.

- `prepare_output_dir` runs before anything loads: an --output_dir holding another run's outputs is
  refused unless --overwrite_output_dir (which removes them, checkpoints too) or --resume_from_checkpoint.
- A checkpoint holds the trainable weights, optimizer and scheduler, the trainer's state (step, data
  position, KL coefficient, ...), each process's RNG states and unlogged metric sums, and the config's
  fingerprint: the settings that change the math. Resuming a checkpoint whose settings differ is refused
  with the differing settings named.
- A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `step-N` when complete; older
  ones are pruned (--save_total_limit) only after that, so a kill at any moment leaves a loadable one.
- Everything loads with `torch.load(weights_only=True)`: a checkpoint cannot run code.
- Under FSDP the files are the same as a 1-process run's (full weights, full optimizer state): rank 0 gathers
  them to save and broadcasts them on load (`alignkit.train.sharding`), so a checkpoint does not depend on
  the sharding.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
from pathlib import Path

import torch

from alignkit import atomic
from alignkit.train import sharding

logger = logging.getLogger(__name__)

# settings that do not change the weights a run produces: they may differ between a run and its resumption
NOT_IN_FINGERPRINT = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "eval_steps", "eval_dataset",
    "per_device_eval_batch_size", "save_steps", "save_total_limit", "progress", "report_to", "skip_nonfinite",
    "gradient_checkpointing",
})

# what a training run writes into --output_dir (glob patterns); README.md only beside a LoRA adapter
RUN_OUTPUTS = (
    "config.yaml", "metrics.jsonl", "data_report.json", "checkpoints", "config.json", "generation_config.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "adapter_config.json",
    "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "value_head.safetensors", "critic", "reward_normalization.json",
    "*.tmp-*", ".tmp-*",
)

STEP_DIR = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------------------------
# fingerprint


def fingerprint_fields(cfg) -> dict:
    """The settings that change the math (model, data, seeds, optimizer, batch sizes, loss settings, ...):
    every config field except NOT_IN_FINGERPRINT, plus the stage (the config's class), plus what each
    training data set holds (`dataset contents`: see data_contents), since the same path can hold other rows."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_IN_FINGERPRINT}
    for name in DATA_FIELDS:
        if fields.get(name):
            fields[f"{name} contents"] = data_contents(fields[name])
    # PPO's reward is part of the objective: an edited reward file changes the math as much as edited data.
    # --gold_reward_fn is not hashed: it only scores samples for the log and never reaches the update (its
    # spec, a setting, is still compared).
    if reward_files := reward_fn_contents(fields.get("reward_fn") or ""):
        fields["reward_fn contents"] = reward_files
    return {"stage": type(cfg).__name__, **fields}


def reward_fn_contents(reward_fn: str) -> str:
    """'FILE: sha256:…' for each `path/file.py:function` in a --reward_fn list ('' when there is none).
    `builtin:` rewards are alignkit's code; an importable `module:function` is installed code, like alignkit."""
    files = [spec.rpartition(":")[0] for spec in (s.strip() for s in reward_fn.split(",")) if spec.rpartition(":")[0].endswith(".py")]
    return ", ".join(f"{f}: sha256:{_file_digest(Path(f))}" if Path(f).is_file() else f"{f}: missing" for f in files)


DATA_FIELDS = ("dataset", "ptx_dataset")  # the training data; eval data does not change the weights
_hashed: dict[tuple, str] = {}  # (path, size, mtime) -> digest: a run hashes each file once, not at every checkpoint


def data_contents(source: str) -> str:
    """What a data source holds, beyond its name: a file's SHA-256 (streamed in 1 MiB chunks: a changed row
    can keep the size, and mtime says nothing about the bytes); a directory's over its files' relative paths
    and bytes; a hub id's revision in the local hub cache (no network); `builtin:` tasks are code, so their
    name and split (already settings) say everything."""
    if source.startswith(("builtin:", "builtin_pref:")):
        return "builtin"
    path = Path(source)
    if path.is_file():
        return "sha256:" + _file_digest(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{_file_digest(file)}\0".encode())
        return "sha256:" + digest.hexdigest()[:16]
    return _hub_revision(source)


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashed:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        _hashed[key] = digest.hexdigest()[:16]
    return _hashed[key]


def _hub_revision(dataset_id: str) -> str:
    """The commit the local hub cache last resolved `main` to for `ID[:CONFIG]` (what `datasets` loads from)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE, "datasets--" + dataset_id.partition(":")[0].replace("/", "--"), "refs", "main")
    return f"revision:{ref.read_text().strip()}" if ref.is_file() else "revision: not in the local hub cache"


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(saved: dict, current: dict) -> list[str]:
    """'name: was A, now B' for each setting both know and that differs."""
    return [f"{name}: was {saved[name]!r}, now {current[name]!r}" for name in current if name in saved and saved[name] != current[name]]


def check_fingerprint(checkpoint: Path, cfg) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("config")
    if saved is None:
        logger.warning("%s has no config fingerprint (written by an older alignkit): resuming without checking its settings", checkpoint)
        return
    current = fingerprint_fields(cfg)
    # a checkpoint written before data contents were fingerprinted is checked on its settings alone
    current = {k: v for k, v in current.items() if k in saved or not k.endswith(" contents")}
    if state.get("fingerprint") != fingerprint(current):
        changed = differences(saved, current) or ["(settings this version does not know)"]
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: written by a run with other settings: {'; '.join(changed)}. "
                         "Resume with the same settings, or start a new run in another --output_dir")


def check_processes(checkpoint: Path) -> None:
    """A checkpoint resumes with the number of processes that wrote it (the launcher's WORLD_SIZE): the global
    batch (per-device batch x accumulation x processes), the data position and each process's RNG and unlogged
    metric sums depend on it. Its files do not depend on the sharding (DDP and FSDP resume each other's)."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("processes")
    now = int(os.environ.get("WORLD_SIZE", "1"))
    if saved is not None and saved != now:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: written by a run of {saved} process(es), this one has {now}: the global "
                         f"batch and the data position would change. Resume with {saved} process(es) (accelerate launch --num_processes {saved}), "
                         "or start a new run in another --output_dir")


def check_config_file(output_dir: Path, cfg) -> None:
    """Resuming into a directory whose config.yaml (the run that wrote it) has other settings would mix two runs."""
    import yaml

    path = output_dir / "config.yaml"
    if not path.exists():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    changed = differences(saved, {k: v for k, v in fingerprint_fields(cfg).items() if k != "stage"})
    if changed:
        raise ValueError(f"--output_dir {output_dir} holds a run with other settings ({'; '.join(changed)}); resuming into it would mix two runs. "
                         "Use the same settings, another --output_dir, or --overwrite_output_dir to remove it")


# ---------------------------------------------------------------------------------------------
# the output directory


def run_outputs(output_dir: Path) -> list[str]:
    """Names in output_dir that a training run writes."""
    if not output_dir.is_dir():
        return []
    names = sorted(p.name for p in output_dir.iterdir())
    found = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in RUN_OUTPUTS)]
    if "adapter_config.json" in names and "README.md" in names:
        found.append("README.md")  # peft writes it beside the adapter
    return found


def remove_run_outputs(output_dir: Path, names: list[str]) -> None:
    for name in names:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def prepare_output_dir(cfg) -> Path | None:
    """The output-dir guard of every trainer; call it before loading anything. Returns the checkpoint to
    resume from (None: start fresh). Raises ValueError, naming the directory and the ways out, when
    --output_dir is a file or holds another run's outputs without --overwrite_output_dir or
    --resume_from_checkpoint, and when the checkpoint (or the directory's run) has other settings."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir}: is a file, not a directory; pass a directory to write the run into")
    if int(os.environ.get("RANK", "0")) != 0:
        # rank 0 decides (and refuses, which ends the whole torchrun group); the others would see its first writes
        return find_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    found = run_outputs(output_dir)
    if cfg.resume_from_checkpoint:
        checkpoint = find_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
        inside = checkpoint is not None and output_dir.resolve() in checkpoint.resolve().parents
        if cfg.overwrite_output_dir and (cfg.resume_from_checkpoint == "latest" or inside):
            raise ValueError("--overwrite_output_dir would remove the checkpoint --resume_from_checkpoint asks for; pass only one of them")
        if checkpoint is None:
            logger.warning("no checkpoint in %s: starting fresh", output_dir / "checkpoints")
        else:
            check_fingerprint(checkpoint, cfg)
            check_processes(checkpoint)
        if cfg.overwrite_output_dir:
            remove_run_outputs(output_dir, found)
        elif found:
            check_config_file(output_dir, cfg)
        return checkpoint
    if found and cfg.overwrite_output_dir:
        logger.warning("--overwrite_output_dir: removing %s from %s", ", ".join(found), output_dir)
        remove_run_outputs(output_dir, found)
    elif found:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(f"--output_dir {output_dir} holds another run's outputs ({shown}). Pass --overwrite_output_dir to remove them "
                         "(checkpoints too) and start over, --resume_from_checkpoint latest to continue that run, or another --output_dir")
    return None


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a trainer_state.json inside) of a run, oldest first."""
    found = [p for p in Path(output_dir, "checkpoints").glob("step-*") if STEP_DIR.match(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(spec: str, output_dir: str) -> Path | None:
    """PATH, or 'latest' (None when the run has none yet), or '' (None)."""
    if not spec:
        return None
    if spec == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a checkpoint (no trainer_state.json)")
    return path


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def kill_point(variable: str, step: int) -> None:
    """Test hook for exact-resume tests with real kills: when the environment variable (ALIGNKIT_KILL_AT_STEP:
    after step N's update and metrics, before its checkpoint; ALIGNKIT_KILL_IN_SAVE: halfway through writing
    checkpoint N) equals this step, the process SIGKILLs itself."""
    if os.environ.get(variable) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(directory: Path, accelerator, model, optimizer, scheduler, state: dict, keep: int, cfg,
                    process_state: dict | None = None) -> None:
    """Everything exact resume needs: trainable weights, optimizer, schedule, the trainer's state (JSON),
    each process's RNG and `process_state` (tensors), the config fingerprint. Written into a temporary
    directory and renamed into place; then all but the newest `keep` checkpoints are removed."""
    from safetensors.torch import save_file

    tmp = directory.with_name(f".tmp-{directory.name}")  # one name every process agrees on
    state = {**state, "processes": accelerator.num_processes}  # a resumption must run as many (check_processes)
    step = int(directory.name.split("-")[1])
    if sharding.is_sharded(model):  # FSDP: every process sends its shards; rank 0 gets the full tensors, saved as 1 process saves them
        gathered = sharding.gather_checkpoint_state(model, optimizer)
    elif accelerator.is_main_process:
        gathered = trainable_state(accelerator.unwrap_model(model)), optimizer.state_dict()
    if accelerator.is_main_process:
        weights, optimizer_state = gathered
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        kill_point("ALIGNKIT_KILL_IN_SAVE", step)
        fields = fingerprint_fields(cfg)
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "fingerprint": fingerprint(fields), "config": fields}, indent=1, default=str))
    accelerator.wait_for_everyone()
    torch.save({**rng_state(), "process": process_state or {}}, tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic.replace_dir(tmp, directory)
        if keep > 0:
            for old in checkpoints(directory.parent.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _safe_load(path: Path):
    """A checkpoint file, loaded without running code (weights_only); a file that is not one is refused."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except Exception as error:  # pickle, safetensors and zip errors have no common base class
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--resume_from_checkpoint: {path} cannot be loaded safely (tensors only, weights_only=True): {first}") from None


def load_checkpoint(directory: Path, accelerator, model, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore a checkpoint into model, optimizer and scheduler and this process's RNG; returns (the
    trainer's state, this process's saved `process_state`)."""
    if sharding.is_sharded(model):
        _load_sharded(directory, accelerator, model, optimizer, scheduler)
    else:
        params = dict(accelerator.unwrap_model(model).named_parameters())
        weights = _safe_load(directory / "trainable.safetensors")
        _check_weights(directory, weights, params)
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        saved = _safe_load(directory / "optimizer.pt")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    process_state: dict = {}
    rng_file = directory / f"rng_{accelerator.process_index}.pt"
    if rng_file.exists():
        rng = _safe_load(rng_file)
        set_rng_state(rng)
        process_state = rng.get("process", {})
    state = json.loads((directory / "trainer_state.json").read_text())
    return {k: v for k, v in state.items() if k not in ("fingerprint", "config", "processes")}, process_state


def _check_weights(directory: Path, weights: dict, params: dict) -> None:
    missing = sorted(set(name for name, p in params.items() if p.requires_grad) - set(weights))
    if missing:
        raise ValueError(f"--resume_from_checkpoint {directory}: no weights for {missing[:3]} (a checkpoint of another model?)")


def _load_sharded(directory: Path, accelerator, model, optimizer, scheduler) -> None:
    """FSDP: rank 0 reads the checkpoint (the 1-process format) and broadcasts it; each process keeps its shards.
    Rank 0 tells every process whether the files loaded, so a bad checkpoint stops them all with its message
    (rather than leaving the others waiting for tensors that never come)."""
    weights = optimizer_state = None
    message: list = [None, None]  # [error, the scheduler's state]
    if accelerator.is_main_process:
        try:
            weights = _safe_load(directory / "trainable.safetensors")
            _check_weights(directory, weights, dict(model.named_parameters()))
            saved = _safe_load(directory / "optimizer.pt")
            optimizer_state, message = saved["optimizer"], [None, saved["scheduler"]]
            sharding.check_optimizer_state(optimizer, optimizer_state)
        except (ValueError, KeyError, TypeError) as error:
            message = [f"--resume_from_checkpoint {directory}: {error}" if isinstance(error, (KeyError, TypeError)) else str(error), None]
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0]:
        raise ValueError(message[0])
    scheduler.load_state_dict(message[1])
    sharding.load_checkpoint_state(model, optimizer, weights, optimizer_state)


def drop_later_checkpoints(output_dir: Path, step: int) -> None:
    """On resume: checkpoints past the resumed step belong to the abandoned continuation, as do the
    temporary files and folders of killed writes."""
    for path in checkpoints(output_dir):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path, ignore_errors=True)
    for path in [*Path(output_dir, "checkpoints").glob(".tmp-step-*"), *Path(output_dir).glob(".tmp-model-*"), *Path(output_dir).glob("*.tmp-*")]:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# numerical faults


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run."""


def nonfinite_step(loss: float, grad_norm: float | None, step: int, cfg) -> bool:
    """True when this step's loss or gradient norm is inf/nan and --skip_nonfinite asks to skip it; raises
    NonFiniteError (naming the step and the last good checkpoint) when it is not set."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return False
    what = f"loss {loss}" + ("" if grad_norm is None else f", gradient norm {grad_norm}")
    if cfg.skip_nonfinite:
        logger.warning("step %d: %s; skipped (--skip_nonfinite)", step, what)
        return True
    found = checkpoints(cfg.output_dir)
    last = f"the last good checkpoint is {found[-1]}" if found else "there is no checkpoint (see --save_steps)"
    raise NonFiniteError(f"step {step}: {what} is not finite; stopped before updating the weights. {last}; "
                         "--resume_from_checkpoint latest --skip_nonfinite continues from it, skipping such steps")


def advance_schedule(scheduler) -> None:
    """scheduler.step(), also after a skipped optimizer step (torch warns when the first step was skipped; the
    schedule must still advance so the learning rate stays a function of the step number)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"), category=UserWarning)
        scheduler.step()
