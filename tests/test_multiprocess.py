"""Two processes (torchrun, gloo on CPU) give the same loss and weights as one process accumulating two
micro-batches: the step normalizer spans processes, and nobody trains alone by accident."""

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from alignkit.data import tasks
from alignkit.data.formats import write_jsonl


def test_two_processes_equal_one_process_with_accumulation(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(tasks.make_mixture(["reversal", "arithmetic"], "train", 8, seed=2), data)
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
              "--no_progress", "--max_grad_norm", "0", "--lr_scheduler_type", "constant"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "alignkit.cli", "sft", *common, "--output_dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "alignkit.cli", "sft", *common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    rows = {name: [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")] for name in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2]
    for a, b in zip(rows["one"], rows["two"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"] and a["tokens"] == b["tokens"]
    w1, w2 = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    assert all(torch.allclose(w1[n], w2[n], atol=2e-5) for n in w1)
