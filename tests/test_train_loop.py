"""The trainer: memorisation, exact resume, gradient checkpointing, validation, plot, config, CLI."""

from __future__ import annotations

import lmx  # isort: skip

import argparse
import itertools
import json
import math
import struct
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from lmx.errors import InvalidOptionError, ModelNotFoundError
from lmx.train import TrainConfig, Trainer
from lmx.train.grad_checkpoint import CheckpointedLayer
from lmx.train.lora import adapter_weights, load_adapter
from lmx.train.optim import lr_schedule
from lmx.train.plot import TRAIN_COLOR, VAL_COLOR

LINE = " The quick brown fox jumps over the lazy dog."


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qa")
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}?\nA:", "completion": f" {2 * i}."} for i in range(8)]
    _write(d / "train.jsonl", rows)
    _write(d / "valid.jsonl", rows[:3])
    return d


def _config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), adapter_path=str(out), quiet=True, save_every=0, lr=1e-2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_memorises_a_line_and_the_adapter_generates_it(tiny_dirs, tmp_path, arch):
    data = tmp_path / "mem"
    _write(data / "train.jsonl", [{"prompt": "Say the line:", "completion": LINE}])
    config = _config(tiny_dirs[arch], data, tmp_path / "ad", iters=30, batch_size=1, mask_prompt=True, rank=8)
    result = Trainer(config).run()
    losses = [loss for _, loss in result.history]
    assert len(losses) == 30 and losses[0] > 4.0
    # random tiny models bound their logits, so the floor is ~1.3 rather than 0
    assert min(losses) < 1.8
    with lmx.load(tiny_dirs[arch]) as engine:
        assert engine.generate("Say the line:", max_tokens=30).text != LINE
        load_adapter(engine.model, result.adapter_path)
        completion = engine.generate("Say the line:", max_tokens=30)
    assert completion.text == LINE and completion.finish_reason == "stop"


def test_resume_continues_with_the_identical_loss_sequence(tiny_dirs, qa_data, tmp_path):
    kw = dict(iters=6, batch_size=2, grad_accum=2, save_every=3, dropout=0.1, warmup=2, mask_prompt=True, seed=3)
    full = Trainer(_config(tiny_dirs["gemma3"], qa_data, tmp_path / "full", **kw)).run()
    assert len(full.history) == 6

    first = Trainer(_config(tiny_dirs["gemma3"], qa_data, tmp_path / "split", **kw))
    for report in first.steps():
        if report.step == 4:  # one step past the checkpoint at 3: resume must redo it
            break
    assert (tmp_path / "split" / "checkpoints" / "step-000003" / "optimizer.safetensors").is_file()
    resumed = Trainer(_config(tiny_dirs["gemma3"], qa_data, tmp_path / "split", resume=True, **kw))
    assert resumed.step == 3
    result = resumed.run()
    assert result.history == full.history  # steps 1-3 from the checkpoint, 4-6 recomputed: bit-identical
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "split" / "adapters.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(np.array(a[name]), np.array(b[name]))


def test_resume_refuses_changed_settings_and_missing_checkpoints(tiny_dirs, qa_data, tmp_path):
    Trainer(_config(tiny_dirs["gemma3"], qa_data, tmp_path / "a", iters=2, batch_size=2, save_every=1)).run()
    with pytest.raises(InvalidOptionError, match=r"rank=8 -> 4"):
        Trainer(_config(tiny_dirs["gemma3"], qa_data, tmp_path / "a", iters=2, batch_size=2, rank=4, resume=True))
    with pytest.raises(ModelNotFoundError, match="no checkpoint"):
        Trainer(_config(tiny_dirs["gemma3"], qa_data, tmp_path / "b", iters=2, batch_size=2, resume=True))


def test_grad_checkpointing_gives_the_same_training(tiny_dirs, qa_data, tmp_path):
    kw = dict(iters=3, batch_size=2, dropout=0.2)
    plain = Trainer(_config(tiny_dirs["qwen3"], qa_data, tmp_path / "a", **kw))
    names = sorted(adapter_weights(plain.model))
    plain_losses = [r.loss for r in plain.steps()]
    ckpt = Trainer(_config(tiny_dirs["qwen3"], qa_data, tmp_path / "b", grad_checkpoint=True, **kw))
    wrapped = []
    ckpt_losses = []
    for report in ckpt.steps():
        wrapped.append(all(isinstance(layer, CheckpointedLayer) for layer in ckpt.model.layers))
        assert sorted(adapter_weights(ckpt.model)) == names  # wrapping keeps parameter names
        ckpt_losses.append(report.loss)
    assert all(wrapped)
    assert not any(isinstance(layer, CheckpointedLayer) for layer in ckpt.model.layers)  # unwrapped after
    np.testing.assert_allclose(ckpt_losses, plain_losses, rtol=1e-5)
    for name in names:
        np.testing.assert_allclose(
            np.array(adapter_weights(ckpt.model)[name]), np.array(adapter_weights(plain.model)[name]), atol=1e-6
        )


def _png_pixels(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h = size
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_validation_plot_and_history(tiny_dirs, qa_data, tmp_path):
    config = _config(tiny_dirs["gemma3"], qa_data, tmp_path / "ad", iters=4, batch_size=2, val_every=2)
    result = Trainer(config).run()
    assert [s for s, _ in result.val_history] == [2, 4]
    assert result.final_val is not None
    assert result.final_val.perplexity == pytest.approx(math.exp(result.final_val.loss))
    assert result.final_val.examples == 3
    assert result.val_history[-1][1] == result.final_val.loss
    pixels = _png_pixels(result.loss_curve)
    assert result.loss_curve == tmp_path / "ad" / "loss_curve.png"
    assert pixels.shape == (400, 640, 3)
    for color in (TRAIN_COLOR, VAL_COLOR):
        assert (pixels == color).all(axis=-1).sum() > 20
    history = json.loads((tmp_path / "ad" / "history.json").read_text())
    assert [tuple(x) for x in history["train"]] == result.history


def test_schedule_warms_up_then_decays_to_min_lr():
    sched = lr_schedule(1.0, 10, warmup=2, schedule="cosine", min_lr=0.1)
    values = [float(sched(mx.array(s))) for s in range(11)]
    assert values[0] == pytest.approx(0.5) and values[1] < 1.0
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[2:]))
    assert values[10] == pytest.approx(0.1)
    constant = lr_schedule(0.3, 10, schedule="constant")
    assert float(constant(mx.array(7))) == pytest.approx(0.3)


# ---------------------------------------------------------------------- config and CLI


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_config_from_yaml_with_flags_winning(tmp_path):
    from lmx.cli import train as train_cli

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"rank": 4, "batch-size": 2, "mask_prompt": True, "lr": 0.001}))
    args = _parse(train_cli, ["train", "--config", str(tmp_path / "c.yaml"), "--rank", "16", "--no-mask-prompt"])
    config = TrainConfig.from_args(args)
    assert (config.rank, config.batch_size, config.mask_prompt, config.lr) == (16, 2, False, 0.001)
    args = _parse(train_cli, ["train", "--targets", "q_proj,v_proj", "--grad-checkpoint", "--iters", "5"])
    config = TrainConfig.from_args(args)
    assert config.targets == ("q_proj", "v_proj") and config.grad_checkpoint and config.iters == 5
    assert config.model is None  # the bundled default model
    # every field is a flag and a YAML key: the dataclass is the single source
    assert TrainConfig.from_dict(config.as_dict()) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rank": 0}, "rank must be >= 1, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"targets": "q_proj,gate"}, "targets must be a non-empty subset of q_proj"),
        ({"schedule": "step"}, "schedule must be one of cosine, linear, constant, got 'step'"),
        ({"iters": 5, "epochs": 2}, "give iters or epochs, not both"),
        ({"batch_size": "four"}, "batch_size must be an integer, got 'four'"),
        ({"lr": "nan"}, "lr must be a finite number"),
        ({"mask_prompt": "maybe"}, "mask_prompt must be true or false, got 'maybe'"),
        ({"learning_rate": 1.0}, "unknown key 'learning_rate'; allowed: adapter_path"),
    ],
)
def test_config_errors_name_the_value(values, message):
    with pytest.raises(InvalidOptionError, match=message):
        TrainConfig.from_dict(values)


def test_yaml_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(InvalidOptionError, match="must hold a mapping"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(InvalidOptionError, match="cannot read config file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_cli_train_eval_fuse(tiny_dirs, qa_data, tmp_path, capsys):
    from lmx.cli import eval as eval_cli
    from lmx.cli import fuse as fuse_cli
    from lmx.cli import train as train_cli

    model, out = str(tiny_dirs["qwen3"]), str(tmp_path / "ad")
    argv = ["train", "-m", model, "--data", str(qa_data), "--adapter-path", out, "--iters", "2", "--batch-size", "2"]
    args = _parse(train_cli, [*argv, "--quiet", "--json", "--lr", "0.01"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["adapter_path"] == out and summary["val_loss"] > 0

    def evaluate(*extra: str) -> dict:
        args = _parse(eval_cli, ["eval", "-m", model, "--data", str(qa_data), "--json", *extra])
        assert args.func(args) == 0
        return json.loads(capsys.readouterr().out)

    base, adapted = evaluate(), evaluate("--adapter", out)
    assert base["data"].endswith("valid.jsonl") and base["examples"] == 3
    assert adapted["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert base["loss"] != adapted["loss"]
    assert adapted["perplexity"] == pytest.approx(math.exp(adapted["loss"]))

    assert evaluate("--split", "train")["examples"] == 8

    args = _parse(fuse_cli, ["fuse", "-m", model, "--adapter", out, "--out", str(tmp_path / "fused")])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "fused")
    args = _parse(eval_cli, ["eval", "-m", str(tmp_path / "fused"), "--data", str(qa_data), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(adapted["loss"], rel=1e-4)
