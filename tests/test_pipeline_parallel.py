"""Pipeline parallelism: the split by layers (in process), and 2 ring processes on localhost under
``mlx.launch`` giving the single-process greedy tokens with about half the layers each."""

from __future__ import annotations

import lmx  # isort: skip

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lmx.errors import InvalidOptionError, UnsupportedModelError
from lmx.models import build_model
from lmx.models.pipeline_parallel import Absent, layer_range, split_model
from lmx.runtime.distributed import Group
from test_tensor_parallel import (
    PROMPTS,
    WORKER,
    _hf_greedy,
    _two_at_once,
    free_port_pair,
    kill_one_of_two_ranks,
    launch_env,
    launcher,
    lmx_cli,
    run_single,
    serving,
)


def run_pipeline(out: Path, values: dict, n: int = 2, timeout: float = 300) -> list[dict]:
    """Run tp_worker.py in ``n`` ring processes with ``pipeline_parallel=n``; each rank's record."""
    command = [*launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n)]
    command += ["--starting-port", str(free_port_pair() if n == 2 else _free_ports(n)), "--"]
    command += [sys.executable, str(WORKER), str(out), json.dumps({**values, "pipeline_parallel": n})]
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def _free_ports(n: int) -> int:
    from lmx.runtime.distributed import free_ports

    return free_ports(n)


def _tiny(arch: str, **overrides) -> object:
    from tiny_models import gemma_config, qwen_config

    config = gemma_config(**overrides) if arch == "gemma3" else qwen_config(**overrides)
    config["model_type"] = "gemma3_text" if arch == "gemma3" else "qwen3"
    return build_model(config)


# ------------------------------------------------------------------------------------------ the split itself


def test_layer_ranges_are_contiguous_and_cover_every_layer_once():
    assert [layer_range(26, r, 2) for r in range(2)] == [(0, 13), (13, 26)]
    assert [layer_range(18, r, 4) for r in range(4)] == [(0, 5), (5, 10), (10, 14), (14, 18)]
    assert [layer_range(4, r, 3) for r in range(3)] == [(0, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_split_model_keeps_this_ranks_layers_and_ends(arch):
    tied = arch == "gemma3"  # the tiny Gemma ties its head to the embedding, the tiny Qwen does not
    for rank in (0, 1):
        model = _tiny(arch, num_hidden_layers=4)
        plan = split_model(model, Group(rank=rank, size=2, backend="ring", split="pipeline-parallel"))
        assert (plan.start, plan.stop) == ((0, 2) if rank == 0 else (2, 4))
        held = [i for i, layer in enumerate(model.layers) if not isinstance(layer, Absent)]
        assert held == list(range(plan.start, plan.stop))
        assert ("embed_tokens" in model.model) == (rank == 0)
        assert ("lm_head" in model) == (rank == 0 and not tied)
        assert ("norm" in model.model) == (rank == 1)
        # the tensors a rank reads, by checkpoint name (HF, multimodal HF, GGUF)
        assert plan.keeps("model.layers.1.mlp.up_proj.weight") == (rank == 0)
        assert plan.keeps("model.language_model.layers.3.self_attn.q_proj.weight") == (rank == 1)
        assert plan.keeps("model.embed_tokens.weight") == (rank == 0)
        assert plan.keeps("lm_head.weight") == (rank == 0)
        assert plan.keeps("model.norm.weight") == (rank == 1)
        assert plan.keeps("model.layers.2.input_layernorm.weight") == (rank == 1)
        assert plan.holds["layers"] == ("0-1 of 4" if rank == 0 else "2-3 of 4")
        assert [r["layers"] for r in plan.ranks] == ["0-1 of 4", "2-3 of 4"]


def test_split_model_refuses_what_it_cannot_split():
    with pytest.raises(UnsupportedModelError, match="over 5 ranks needs at least 5 decoder layers; this model has 4"):
        split_model(_tiny("gemma3"), Group(0, 5, "ring", split="pipeline-parallel"))
    from tiny_models import qwen_moe_config

    moe = build_model({**qwen_moe_config(), "model_type": "qwen3_moe"})
    with pytest.raises(UnsupportedModelError, match="'qwen3_moe' is not supported"):
        split_model(moe, Group(0, 2, "ring", split="pipeline-parallel"))


def test_pipeline_parallel_refusals_name_the_bad_values(tiny_dirs):
    with pytest.raises(InvalidOptionError, match="started in a group of 1.*mlx.launch -n 2"):
        lmx.load(tiny_dirs["gemma3"], pipeline_parallel=2)
    with lmx.load(tiny_dirs["gemma3"], pipeline_parallel=1) as one, lmx.load(tiny_dirs["gemma3"]) as plain:
        assert one.info().tensor_parallel is None  # a group of one: no split
        assert one.generate("Hello", max_tokens=6).tokens == plain.generate("Hello", max_tokens=6).tokens
    with pytest.raises(InvalidOptionError, match="pipeline_parallel must be an integer >= 1, got 0"):
        lmx.load(tiny_dirs["gemma3"], pipeline_parallel=0)
    with pytest.raises(InvalidOptionError, match="tensor_parallel=2 and pipeline_parallel=2 cannot be combined"):
        lmx.load(tiny_dirs["gemma3"], tensor_parallel=2, pipeline_parallel=2)
    with pytest.raises(InvalidOptionError, match="draft_model= is not supported with pipeline_parallel"):
        lmx.load(tiny_dirs["gemma3"], pipeline_parallel=2, draft_model=tiny_dirs["gemma3"])
    with pytest.raises(InvalidOptionError, match="adapter= is not supported with pipeline_parallel"):
        lmx.load(tiny_dirs["gemma3"], pipeline_parallel=2, adapter="somewhere")
    both = lmx_cli(
        "generate", "-m", str(tiny_dirs["gemma3"]), "--tensor-parallel", "2", "--pipeline-parallel", "2", "hi"
    )
    assert both.returncode != 0 and "--tensor-parallel 2 and --pipeline-parallel 2 cannot be combined" in both.stderr


# ------------------------------------------------------------------------------------------ 2 ring processes


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma3", "qwen3"], ids=["gemma3-tied", "qwen3-untied"])
def test_two_ranks_generate_the_single_process_greedy_tokens_with_half_the_layers_each(arch, tmp_path):
    from tiny_models import save_tiny

    model_dir = tmp_path / "model"
    save_tiny(arch, model_dir, num_hidden_layers=4)
    values = {"model": str(model_dir), "prompts": PROMPTS, "max_tokens": 12}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = run_single(tmp_path / "one", values)
    ranks = run_pipeline(tmp_path / "two", values)
    assert [r["tensor_parallel"]["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["tensor_parallel"]["split"] == "pipeline-parallel"
    assert ranks[0]["tokens"] == single["tokens"]
    assert ranks[1]["completed"] == ranks[0]["completed"] == len(PROMPTS)
    assert ranks[1]["steps"] == ranks[0]["steps"] == single["steps"]
    with lmx.load(model_dir) as engine:
        ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    for prompt_ids, got in zip(ids, ranks[0]["tokens"]):
        assert got == _hf_greedy(model_dir, prompt_ids, len(got))
    # 4 equal layers: each rank holds exactly half of the layers' weights
    for r in ranks:
        assert r["layer_bytes"] == single["layer_bytes"] // 2
    head = ["model.embed_tokens.weight"] + ([] if arch == "gemma3" else ["lm_head.weight"])
    assert ranks[0]["param_names"] == sorted(head)  # the embedding and the LM head on rank 0 alone
    assert ranks[1]["param_names"] == ["model.norm.weight"]  # the final norm on the last rank alone


@pytest.mark.slow
def test_three_ranks_pass_the_stream_through_a_middle_rank(tmp_path):
    from tiny_models import save_tiny

    save_tiny("gemma3", tmp_path / "model")
    values = {"model": str(tmp_path / "model"), "prompts": PROMPTS, "max_tokens": 10}
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    single = run_single(tmp_path / "one", values)
    ranks = run_pipeline(tmp_path / "three", values, n=3)
    assert ranks[0]["tokens"] == single["tokens"]
    assert [r["tensor_parallel"]["holds"]["layers"] for r in ranks] == ["0-1 of 4", "2-2 of 4", "3-3 of 4"]
    assert ranks[1]["param_names"] == []  # a middle rank: layers only


@pytest.mark.slow
def test_a_prompt_prefilled_in_several_chunks_reaches_the_last_rank_whole(tmp_path):
    # a chunk's output is read by no one on the first rank (only the caches are evaluated): it must still be sent
    from tiny_models import save_tiny

    save_tiny("gemma3", tmp_path / "model")
    long = "The quick brown fox jumps over the lazy dog. " * 30
    values = {"model": str(tmp_path / "model"), "prompts": [long], "max_tokens": 8}
    with lmx.load(tmp_path / "model") as engine:
        assert len(engine.tokenizer.encode(long)) > 2 * engine.loaded.profile.prefill_step_size  # 3 chunks at least
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = run_single(tmp_path / "one", values)
    ranks = run_pipeline(tmp_path / "two", values)
    assert ranks[0]["tokens"] == single["tokens"] and len(single["tokens"][0]) == 8


@pytest.mark.slow
def test_real_270m_over_two_ranks_equals_one_process(tmp_path):
    values = {"prompts": ["The capital of France is"], "max_tokens": 16}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = run_single(tmp_path / "one", values)
    ranks = run_pipeline(tmp_path / "two", values)
    assert ranks[0]["tokens"] == single["tokens"]
    assert len(single["tokens"][0]) == 16
    assert ranks[1]["steps"] == ranks[0]["steps"] == single["steps"]
    assert [r["tensor_parallel"]["holds"]["layers"] for r in ranks] == ["0-8 of 18", "9-17 of 18"]
    for r in ranks:  # 18 equal layers: 9 each
        assert r["layer_bytes"] == single["layer_bytes"] // 2
    # the tied 262k-row embedding (most of this small model) is held by rank 0 alone
    assert ranks[1]["weights_bytes"] < 0.25 * single["weights_bytes"]
    assert ranks[0]["weights_bytes"] < 0.85 * single["weights_bytes"]
    assert ranks[0]["weights_bytes"] + ranks[1]["weights_bytes"] == single["weights_bytes"]


# ------------------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_tiny

    out = tmp_path_factory.mktemp("gemma")
    save_tiny("gemma3", out)
    return out


@pytest.mark.slow
def test_cli_generate_pipeline_parallel_prints_the_single_process_text_once(gemma_dir):
    one = lmx_cli("generate", "-m", str(gemma_dir), "-n", "12", "-", stdin="Hello world! How are")
    two = lmx_cli(
        "generate", "-m", str(gemma_dir), "-n", "12", "--pipeline-parallel", "2", "-", stdin="Hello world! How are"
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert one.stdout.strip() and two.stdout == one.stdout
    assert two.stderr.count("generated |") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_cli_info_pipeline_parallel_shows_which_layers_each_rank_holds(gemma_dir):
    out = lmx_cli("info", "-m", str(gemma_dir), "--pipeline-parallel", "2", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    group = json.loads(out.stdout)["model"]["tensor_parallel"]
    assert (group["size"], group["rank"], group["split"]) == (2, 0, "pipeline-parallel")
    assert group["ranks"] == [
        {"layers": "0-1 of 4", "embedding": "embedding and LM head (tied)"},
        {"layers": "2-3 of 4", "final norm": "yes"},
    ]
    text = lmx_cli("info", "-m", str(gemma_dir), "--pipeline-parallel", "2")
    assert text.returncode == 0, text.stderr[-3000:]
    assert "parallel: pipeline parallel over 2 ranks" in text.stdout
    assert "rank 1: layers: 2-3 of 4; final norm: yes" in text.stdout


# ------------------------------------------------------------------------------------------ serving


@pytest.mark.slow
def test_serve_pipeline_parallel_answers_concurrent_openai_requests_as_one_process(gemma_dir):
    with serving("-m", str(gemma_dir)) as url:
        alone = _two_at_once(url)
    with serving("-m", str(gemma_dir), "--pipeline-parallel", "2") as url:
        split = _two_at_once(url)
        stats = httpx.get(url + "/health").json()
        r = httpx.post(url + "/v1/embeddings", json={"model": "m", "input": "hi"})
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": schema}
        structured = httpx.post(url + "/v1/chat/completions", json=body)
    assert split == alone and all(alone)
    assert stats["requests"]["completed"] == 4 and stats["requests"]["batches"] > 0
    assert r.status_code == 400 and "pipeline parallel" in r.json()["error"]["message"]
    # a constraint (structured output) is refused with an OpenAI-shaped 400, not run on rank 0 alone
    assert structured.status_code == 400, structured.text
    assert (
        "constraint is not supported with tensor parallel or pipeline parallel" in structured.json()["error"]["message"]
    )


# ------------------------------------------------------------------------------------------ a rank that dies


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["last-rank-dies", "first-rank-dies"])
def test_a_rank_that_dies_gives_the_survivor_group_lost_error_not_a_hang(gemma_dir, tmp_path, victim):
    # many prompts one after another: the ranks are still generating when one is killed, however fast
    values = {"model": str(gemma_dir), "prompts": ["Hello"] * 500, "max_tokens": 400, "pipeline_parallel": 2}
    code, err = kill_one_of_two_ranks(tmp_path, values, victim)
    assert code == 3, err[-3000:]
    assert (
        f"rank {1 - victim}: GroupLostError: rank {1 - victim} of 2: another rank of the pipeline-parallel group" in err
    )
