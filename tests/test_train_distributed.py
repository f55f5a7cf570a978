"""Data-parallel training: 2 processes on localhost under ``mlx.launch`` (ring backend)."""

from __future__ import annotations

import lmx  # noqa: F401  # isort: skip

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from lmx.train import TrainConfig, Trainer
from lmx.train.lora import adapter_weights
from test_tensor_parallel import free_port_pair, launcher

# Run by each process: the Trainer picks up the group mlx.launch set up (no code path of its own).
WORKER = """
import json, sys
import lmx
import mlx.core as mx
from lmx.train import TrainConfig, Trainer
from lmx.train.lora import adapter_weights

out, values = sys.argv[1], json.loads(sys.argv[2])
trainer = Trainer(TrainConfig.from_dict(values))
result = trainer.run()
mx.save_safetensors(f"{out}/rank{trainer.rank}.safetensors", adapter_weights(trainer.model))
record = {"rank": trainer.rank, "world": trainer.world, "history": result.history,
          "val": result.final_val.as_dict(), "examples": len(trainer._local_batch(0))}
with open(f"{out}/rank{trainer.rank}.json", "w") as f:
    json.dump(record, f)
"""


def test_two_process_ring_run_equals_one_process_on_the_combined_batch(tiny_dirs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}?\nA:", "completion": f" {2 * i}."} for i in range(8)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    values = dict(
        model=str(tiny_dirs["gemma3"]),
        data=str(data),
        iters=3,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        warmup=1,
        mask_prompt=True,
        val_every=0,
        save_every=0,
        quiet=True,
    )
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # two processes share the machine's cores
    command = [
        *launcher(),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1",
        "-n",
        "2",
        "--starting-port",
        str(free_port_pair()),
        "--",
        sys.executable,
        str(tmp_path / "worker.py"),
        str(tmp_path),
        json.dumps({**values, "adapter_path": str(tmp_path / "dp")}),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["examples"] for r in ranks] == [2, 2]  # each process reads half of every batch
    w0, w1 = (mx.load(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert sorted(w0) == sorted(w1) and w0
    for name in w0:
        np.testing.assert_array_equal(np.array(w0[name]), np.array(w1[name]))  # identical on both ranks
    assert ranks[0]["history"] == ranks[1]["history"]
    assert (tmp_path / "dp" / "adapters.safetensors").is_file()  # written by rank 0

    single = Trainer(TrainConfig.from_dict({**values, "adapter_path": str(tmp_path / "one")}))
    start = {name: np.array(value) for name, value in adapter_weights(single.model).items()}
    result = single.run()
    assert single.world == 1
    np.testing.assert_allclose(
        [loss for _, loss in ranks[0]["history"]], [loss for _, loss in result.history], rtol=1e-5
    )
    ones = {name: np.array(value) for name, value in adapter_weights(single.model).items()}
    for name in w0:
        # The sums run in another order (two halves, then the all-sum). Adam divides by the
        # gradient's own scale, so where a gradient is ~0 that float noise can become a step:
        # nearly every element must agree to 1e-6, and none may stray by 5% of training's change.
        diff = np.abs(np.array(w0[name]) - ones[name])
        moved = np.abs(ones[name] - start[name]).max()
        assert moved > 1e-3, name
        assert (diff < 1e-6).mean() > 0.99, name
        assert diff.max() < 0.05 * moved, name
    assert ranks[0]["val"]["examples"] == 5  # validation batches were shared out and summed
    assert ranks[0]["val"]["loss"] == pytest.approx(result.final_val.loss, rel=1e-5)
