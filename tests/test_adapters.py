"""Named LoRA adapters per request (issue 15, part 3): several loaded at once, each row of a
batch with its own adapter or none, checked against each row alone and against a model with
the adapter merged into its weights. The adapters are made here with the training code's LoRA
layers (random, nonzero ``B``), not shipped as files."""

from __future__ import annotations

import lmx  # isort: skip

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lmx.engine import Engine
from lmx.errors import AdapterInUseError, InvalidOptionError, ModelNotFoundError, WeightsError
from lmx.loading import load_model
from lmx.scheduler import QueueSink
from lmx.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    fuse_lora,
    load_adapter,
    save_adapter,
)

PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):"]


def make_adapter(model_dir: Path, out: Path, *, seed: int, rank: int, targets: tuple[str, ...]) -> Path:
    """Write an adapter of random, nonzero weights for the model in ``model_dir``."""
    model = load_model(model_dir, dtype="float32").model
    config = apply_lora(model, rank=rank, alpha=2.0 * rank, targets=targets, seed=seed)
    rng = np.random.default_rng(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):  # B starts at zero: give it values so the adapter changes the output
            layer.lora_b = mx.array(rng.normal(0, 0.3, layer.lora_b.shape).astype(np.float32))
    save_adapter(model, out, config)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(
            tiny_dirs["gemma3"], root / "alpha", seed=1, rank=4, targets=("q_proj", "v_proj", "down_proj")
        ),
        "b": make_adapter(tiny_dirs["gemma3"], root / "beta", seed=2, rank=2, targets=("o_proj", "up_proj")),
    }


@pytest.fixture(scope="module")
def engine(tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path]) -> Iterator[lmx.Engine]:
    """The tiny Gemma with adapters ``a`` and ``b`` loaded."""
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        assert engine.load_adapter(adapter_dirs["a"], name="a") == "a"
        assert engine.load_adapter(adapter_dirs["b"], name="b") == "b"
        yield engine


def _run(engine: lmx.Engine, prompt: str, adapter: str | None, **kw) -> lmx.Completion:
    return engine.generate(prompt, max_tokens=10, adapter=adapter, logprobs=3, **kw)


class Read:
    """A stream read to its end: its token ids and their logprobs."""

    def __init__(self, stream: lmx.TokenStream) -> None:
        tokens = list(stream)
        self.tokens = [t.id for t in tokens]
        self.logprobs = [t.logprob for t in tokens]


# Greedy, and sampled with a seed (a seeded row draws with its own keys, exactly as alone).
SAMPLING = [{}, {"temperature": 1.0, "seed": 7}]


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "seeded"])
def test_mixed_batch_rows_equal_each_row_alone(engine: lmx.Engine, sampling: dict) -> None:
    rows = [(p, ad) for p in PROMPTS for ad in (None, "a", "b")]
    alone = [_run(engine, p, ad, **sampling) for p, ad in rows]
    # the adapters change what is generated, so the comparison below can fail
    for i in range(0, len(rows), 3):
        base, a, b = alone[i : i + 3]
        assert base.logprobs != a.logprobs and base.logprobs != b.logprobs and a.logprobs != b.logprobs
    steps_before = engine.stats().batched_steps
    streams = [engine.stream(p, max_tokens=10, adapter=ad, logprobs=3, **sampling) for p, ad in rows]
    together = [Read(s) for s in streams]
    assert engine.stats().batched_steps > steps_before and engine.stats().max_batch_seen >= len(rows)
    for (p, ad), one, mixed in zip(rows, alone, together):
        assert mixed.tokens == one.tokens, (p, ad)
        np.testing.assert_allclose(mixed.logprobs, one.logprobs, atol=1e-4, err_msg=f"{p!r} {ad}")


def test_each_adapter_equals_a_model_with_it_merged(
    engine: lmx.Engine, tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path]
) -> None:
    streams = {
        (p, ad): engine.stream(p, max_tokens=10, adapter=ad, logprobs=3) for p in PROMPTS for ad in ("a", "b", None)
    }
    mixed = {key: Read(s) for key, s in streams.items()}
    for ad in ("a", "b"):
        loaded = load_model(tiny_dirs["gemma3"], dtype="float32")
        load_adapter(loaded.model, adapter_dirs[ad])
        assert fuse_lora(loaded.model) > 0  # the adapter is in the weights now: an independent reference
        with Engine(loaded) as fused:
            for p in PROMPTS:
                ref = fused.generate(p, max_tokens=10, logprobs=3)
                assert mixed[(p, ad)].tokens == ref.tokens, (p, ad)
                np.testing.assert_allclose(mixed[(p, ad)].logprobs, ref.logprobs, atol=1e-3)
    with lmx.load(tiny_dirs["gemma3"]) as plain:
        for p in PROMPTS:
            assert mixed[(p, None)].tokens == plain.generate(p, max_tokens=10).tokens


def test_base_rows_get_the_base_output_exactly(engine: lmx.Engine, tiny_dirs: dict[str, Path]) -> None:
    with lmx.load(tiny_dirs["gemma3"], prompt_cache=False) as plain:
        want = [plain.generate(p, max_tokens=6, logprobs=3) for p in PROMPTS]
    streams = [engine.stream(p, max_tokens=6, adapter=ad, logprobs=3) for p in PROMPTS for ad in ("a", None)]
    got = [Read(s) for s in streams][1::2]
    for w, g in zip(want, got):
        assert g.tokens == w.tokens
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)


def test_unknown_adapter_names_the_loaded_ones(engine: lmx.Engine) -> None:
    with pytest.raises(InvalidOptionError, match=r"'c' is not loaded.*'a', 'b'"):
        engine.generate("x", adapter="c")
    with pytest.raises(InvalidOptionError, match="adapter must be the name"):
        engine.generate("x", adapter=3)
    assert engine.adapters() == ["a", "b"]


def test_load_refuses_what_does_not_fit_and_changes_nothing(
    engine: lmx.Engine, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    before = engine.generate(PROMPTS[0], max_tokens=5, adapter="a", logprobs=0)
    wrong = tmp_path / "wrong"  # a tensor of another layer size
    wrong.mkdir()
    (wrong / ADAPTER_CONFIG).write_bytes((adapter_dirs["b"] / ADAPTER_CONFIG).read_bytes())
    weights = mx.load(str(adapter_dirs["b"] / ADAPTER_WEIGHTS))
    name = sorted(weights)[0]
    weights[name] = mx.zeros((3, 3))
    mx.save_safetensors(str(wrong / ADAPTER_WEIGHTS), weights)
    with pytest.raises(WeightsError, match=rf"tensor {name.replace('.', '[.]')} has shape \(3, 3\), expected"):
        engine.load_adapter(wrong)
    with pytest.raises(InvalidOptionError, match="'a' is loaded already"):
        engine.load_adapter(adapter_dirs["b"], name="a")
    with pytest.raises(InvalidOptionError, match="adapter name must be"):
        engine.load_adapter(adapter_dirs["b"], name="bad name")
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        engine.load_adapter(tmp_path / "nowhere")
    # a config whose rank disagrees with the tensors, and one naming a module the model lacks
    for change, message in (({"rank": 8}, r"rank 8"), ({"modules": ["model.layers.9.mlp.up_proj"]}, "layers.9")):
        bad = tmp_path / f"bad{len(message)}"
        bad.mkdir()
        for f in adapter_dirs["b"].iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        config = json.loads((bad / ADAPTER_CONFIG).read_text())
        (bad / ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
        with pytest.raises(WeightsError, match=message):
            engine.load_adapter(bad)
    assert engine.adapters() == ["a", "b"]
    after = engine.generate(PROMPTS[0], max_tokens=5, adapter="a", logprobs=0)
    assert after.tokens == before.tokens and after.logprobs == before.logprobs


def test_unload_refuses_an_adapter_in_use_then_unloads(
    tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path]
) -> None:
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        engine.load_adapter(adapter_dirs["a"], name="a")
        engine.load_adapter(adapter_dirs["b"], name="b")
        base = engine.generate(PROMPTS[1], max_tokens=6)
        sink = QueueSink()

        def on_worker() -> None:
            # between two steps: a request using "a" waits, so "a" may not go
            engine.submit(engine.encode_prompt(PROMPTS[1]), engine.options({"adapter": "a", "max_tokens": 6}), sink)
            with pytest.raises(AdapterInUseError, match=r"'a' \(1 request\)"):
                engine.unload_adapter("a")
            with pytest.raises(AdapterInUseError):
                engine.unload_adapter()  # all of them: "a" is in use, so none goes

        engine.run_exclusive(on_worker)
        assert engine.adapters() == ["a", "b"]
        while sink.get() is not None:  # the request runs to its end with its adapter
            pass
        assert engine.unload_adapter("a") is True
        assert engine.adapters() == ["b"]
        with pytest.raises(InvalidOptionError, match="'a' is not loaded"):
            engine.generate("x", adapter="a")
        with pytest.raises(InvalidOptionError, match="'a' is not loaded"):
            engine.unload_adapter("a")
        assert engine.unload_adapter() is True and engine.adapters() == []
        assert engine.unload_adapter() is False
        again = engine.generate(PROMPTS[1], max_tokens=6)  # every layer is its base again
        assert again.tokens == base.tokens


def test_load_and_unload_while_requests_run(tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path]) -> None:
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        want = engine.generate(PROMPTS[2], max_tokens=40)
        results: list[lmx.Completion] = []
        runner = threading.Thread(
            target=lambda: results.extend(engine.generate(PROMPTS[2], max_tokens=40) for _ in range(3))
        )
        runner.start()
        for _ in range(3):
            engine.load_adapter(adapter_dirs["a"], name="a")
            engine.generate(PROMPTS[0], max_tokens=3, adapter="a")
            engine.unload_adapter("a")
        runner.join()
        assert [r.tokens for r in results] == [want.tokens] * 3  # base rows never saw the adapter


def test_prefix_cache_keeps_adapters_apart(tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path]) -> None:
    prompt = "A long shared prompt " * 6
    with lmx.load(tiny_dirs["gemma3"], prompt_cache=False) as fresh:
        fresh.load_adapter(adapter_dirs["a"], name="a")
        want = fresh.generate(prompt + "one", max_tokens=6, adapter="a", logprobs=0)
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        engine.load_adapter(adapter_dirs["a"], name="a")
        engine.generate(prompt + "zero", max_tokens=2)  # the base model's keys for the shared prefix
        first = engine.generate(prompt + "one", max_tokens=6, adapter="a", logprobs=0)
        assert first.metrics.cached_tokens == 0  # not the base model's entry
        second = engine.generate(prompt + "one", max_tokens=6, adapter="a", logprobs=0)
        assert second.metrics.cached_tokens > 0  # its own adapter's entry
    for got in (first, second):
        assert got.tokens == want.tokens
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_load_with_an_adapter_makes_it_the_default(tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path]) -> None:
    with lmx.load(tiny_dirs["gemma3"], adapter=adapter_dirs["a"]) as engine:
        assert engine.adapters() == ["alpha"]  # named after its directory
        assert engine.adapter_path("alpha") == str(adapter_dirs["a"])
        by_default = engine.generate(PROMPTS[0], max_tokens=8)
        named = engine.generate(PROMPTS[0], max_tokens=8, adapter="alpha")
        base = engine.generate(PROMPTS[0], max_tokens=8, adapter=None)
        scores = engine.classify(["hello"], ["yes", "no"])[0].scores
        engine.unload_adapter()
        assert engine.generate(PROMPTS[0], max_tokens=8).tokens == base.tokens  # the default is the base again
        base_scores = engine.classify(["hello"], ["yes", "no"])[0].scores
    assert by_default.tokens == named.tokens  # the second ran from the first's cached prefix: rounding aside
    np.testing.assert_allclose(by_default.logprobs, named.logprobs, atol=1e-4)
    assert not np.allclose(base.logprobs, named.logprobs, atol=1e-2)
    assert scores != base_scores  # classify runs with the default adapter too
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        lmx.load(tiny_dirs["gemma3"], adapter=adapter_dirs["a"].parent / "nowhere")


def test_segmented_decode_plan_with_adapters_equals_eager(
    tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path]
) -> None:
    # A GPU's plan (compiled segments, whose traces hold the base model only), run here on the
    # CPU: steps with adapter rows run eagerly, base-only steps in segments; all rows as eager.
    import dataclasses

    from lmx.generate.step import Decoder, DecodeState

    rows = [(p, ad) for p in PROMPTS for ad in (None, "a", "b")]
    results = []
    for mode in ("eager", "segmented"):
        with lmx.load(tiny_dirs["gemma3"], prompt_cache=False) as engine:
            plan = dataclasses.replace(engine.loaded.profile, decode_mode=mode)
            engine.scheduler.decoder = Decoder(DecodeState(engine.model, plan))
            base_first = engine.generate(PROMPTS[0], max_tokens=8).tokens  # traced before any adapter
            engine.load_adapter(adapter_dirs["a"], name="a")
            engine.load_adapter(adapter_dirs["b"], name="b")
            streams = []
            for p, ad in rows:
                streams.append(engine.stream(p, max_tokens=12, adapter=ad))
                next(streams[-1])  # each joins while the others run: padded rows
            mixed = [Read(s).tokens for s in streams]
            base_after = engine.generate(PROMPTS[0], max_tokens=8).tokens  # segments again
            assert engine.scheduler.decoder.state.segments_made == (mode == "segmented")
            results.append((base_first, mixed, base_after))
    assert results[0] == results[1]
    assert results[0][0] == results[0][2]
