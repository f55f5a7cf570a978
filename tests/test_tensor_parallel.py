"""Tensor parallelism: the split itself (in process), and 2 ring processes on localhost under ``mlx.launch``
giving the single-process greedy tokens with half the weights each."""

from __future__ import annotations

import lmx  # isort: skip

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest

from lmx.errors import InvalidOptionError, UnsupportedModelError
from lmx.models import build_model
from lmx.models.tensor_parallel import ShardedToAllLinear, VocabShardedEmbedding, VocabShardedHead, shard_model
from lmx.runtime.distributed import Group

WORKER = Path(__file__).parent / "tp_worker.py"
SRC = Path(lmx.__file__).resolve().parent.parent


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def launcher() -> list[str]:
    script = Path(sys.executable).parent / "mlx.launch"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def launch_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{path}" if path else str(SRC)}


def run_ranks(out: Path, values: dict, n: int = 2, timeout: float = 300) -> list[dict]:
    """Run tp_worker.py in ``n`` ring processes; each rank's record."""
    command = [
        *launcher(),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1",
        "-n",
        str(n),
        "--starting-port",
        str(free_port_pair()),
        "--",
        sys.executable,
        str(WORKER),
        str(out),
        json.dumps({**values, "tensor_parallel": n}),
    ]
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def run_single(out: Path, values: dict, timeout: float = 300) -> dict:
    command = [sys.executable, str(WORKER), str(out), json.dumps(values)]
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "rank0.json").read_text())


# ------------------------------------------------------------------------------------------ the split itself


def _tiny(arch: str, **overrides) -> object:
    from tiny_models import gemma_config, qwen_config

    config = gemma_config(**overrides) if arch == "gemma3" else qwen_config(**overrides)
    config["model_type"] = "gemma3_text" if arch == "gemma3" else "qwen3"
    return build_model(config)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_shard_model_gives_each_rank_its_heads_hidden_units_and_vocabulary(kv_heads):
    for rank in (0, 1):
        model = _tiny("gemma3", num_key_value_heads=kv_heads)
        plan = shard_model(model, Group(rank=rank, size=2, backend="ring"))
        attn = model.layers[0].self_attn
        assert (attn.n_heads, attn.n_kv_heads) == (2, 1)
        assert attn.q_proj.weight.shape == (2 * 16, 64)
        assert attn.k_proj.weight.shape == (16, 64)
        assert isinstance(attn.o_proj, ShardedToAllLinear) and attn.o_proj.weight.shape == (64, 32)
        assert isinstance(model.layers[0].mlp.down_proj, ShardedToAllLinear)
        assert model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
        assert isinstance(model.model.embed_tokens, VocabShardedEmbedding)
        assert model.model.embed_tokens.weight.shape == (192, 64)
        # the KV head a rank keeps is the one its query heads read: split when there are 2, replicated when 1
        k_rows = plan.slices["model.layers.0.self_attn.k_proj.weight"]
        assert k_rows == ((0, 16 * rank, 16 * rank + 16) if kv_heads == 2 else (0, 0, 16))
        assert plan.slices["model.layers.0.self_attn.o_proj.weight"] == (1, 32 * rank, 32 * rank + 32)
        assert plan.slices["model.layers.0.mlp.down_proj.weight"] == (1, 64 * rank, 64 * rank + 64)
        assert plan.slices["model.embed_tokens.weight"] == (0, 192 * rank, 192 * rank + 192)
        assert "model.layers.0.input_layernorm.weight" not in plan.slices  # norms stay whole


def test_untied_head_is_split_by_vocabulary_and_checkpoint_prefixes_match():
    model = _tiny("qwen3")
    plan = shard_model(model, Group(rank=1, size=2, backend="ring"))
    assert isinstance(model.lm_head, VocabShardedHead) and model.lm_head.weight.shape == (192, 64)
    assert plan.slice_of("lm_head.weight") == (0, 192, 384)
    # a multimodal Gemma checkpoint names its text layers under language_model
    assert plan.slice_of("model.language_model.layers.2.mlp.up_proj.weight") == (0, 64, 128)
    w = mx.arange(384 * 4).reshape(384, 4)
    np.testing.assert_array_equal(np.array(plan.take("lm_head.weight", w)), np.array(w[192:]))


def test_shard_model_refuses_what_it_cannot_split():
    with pytest.raises(UnsupportedModelError, match="num_attention_heads divisible by 8"):
        shard_model(_tiny("qwen3"), Group(rank=0, size=8, backend="ring"))
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads"):
        shard_model(_tiny("qwen3", num_attention_heads=6, num_key_value_heads=2), Group(0, 3, "ring"))
    with pytest.raises(UnsupportedModelError, match="vocab_size divisible by 2; this model's vocab_size is 385"):
        shard_model(_tiny("qwen3", vocab_size=385), Group(0, 2, "ring"))
    from tiny_models import qwen_moe_config

    moe = build_model({**qwen_moe_config(), "model_type": "qwen3_moe"})
    with pytest.raises(UnsupportedModelError, match="'qwen3_moe' is not supported"):
        shard_model(moe, Group(0, 2, "ring"))


def test_tensor_parallel_in_a_lone_process_says_how_to_launch(tiny_dirs):
    with pytest.raises(InvalidOptionError, match="started in a group of 1.*mlx.launch -n 2"):
        lmx.load(tiny_dirs["gemma3"], tensor_parallel=2)
    with pytest.raises(InvalidOptionError, match="tensor_parallel must be an integer >= 1, got 0"):
        lmx.load(tiny_dirs["gemma3"], tensor_parallel=0)
    with pytest.raises(InvalidOptionError, match="distributed backend must be one of"):
        lmx.load(tiny_dirs["gemma3"], tensor_parallel=1, distributed_backend="carrier-pigeon")


# ------------------------------------------------------------------------------------------ 2 ring processes

PROMPTS = ["Hello world! How are", "def add(a, b):"]


def _hf_greedy(model_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("gemma3", {"num_key_value_heads": 1}), ("gemma3", {}), ("qwen3", {})],
    ids=["gemma3-1kv", "gemma3-2kv", "qwen3-untied"],
)
def test_two_ranks_generate_the_single_process_greedy_tokens(arch, overrides, tmp_path):
    from tiny_models import save_tiny

    model_dir = tmp_path / "model"
    save_tiny(arch, model_dir, **overrides)
    values = {"model": str(model_dir), "prompts": PROMPTS, "max_tokens": 12}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = run_single(tmp_path / "one", values)
    ranks = run_ranks(tmp_path / "two", values)
    assert [r["tensor_parallel"]["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["tokens"] == single["tokens"]
    # rank 1 replayed rank 0's requests, step for step
    assert ranks[1]["completed"] == ranks[0]["completed"] == len(PROMPTS)
    assert ranks[1]["steps"] == ranks[0]["steps"] == single["steps"]
    # and the reference agrees with the split model, prompt by prompt
    with lmx.load(model_dir) as engine:
        ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    for prompt_ids, got in zip(ids, ranks[0]["tokens"]):
        assert got == _hf_greedy(model_dir, prompt_ids, len(got))
    # the weights are split, not copied
    for r in ranks:
        assert r["weights_bytes"] < 0.6 * single["weights_bytes"]


@pytest.mark.slow
def test_real_270m_over_two_ranks_equals_one_process_with_half_the_weights_each(tmp_path):
    values = {"prompts": ["The capital of France is"], "max_tokens": 16}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = run_single(tmp_path / "one", values)
    ranks = run_ranks(tmp_path / "two", values)
    assert ranks[0]["tokens"] == single["tokens"]
    assert ranks[1]["steps"] == ranks[0]["steps"] == single["steps"]
    assert len(single["tokens"][0]) == 16
    holds = ranks[1]["tensor_parallel"]["holds"]
    assert holds["attention"] == "query heads 2-3 of 4; KV head 0 of 1 (replicated)"
    assert holds["vocabulary"].startswith("tokens 131072-262143 of 262144")
    for r in ranks:
        # each rank holds half the weights (plus the replicated norms and KV projections)
        assert 0.5 * single["weights_bytes"] <= r["weights_bytes"] < 0.52 * single["weights_bytes"]
        assert r["active_memory"] < 0.55 * single["active_memory"]
        # resident memory: the process's own overhead (libraries, tokenizer) is the same, the weights halve
        assert r["rss"] < single["rss"] - 0.35 * single["weights_bytes"]
        assert r["max_rss"] < single["max_rss"] - 0.35 * single["weights_bytes"]  # no whole tensor read on the way


# ------------------------------------------------------------------------------------------ the command line


def lmx_cli(*words: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lmx.cli.main", *words]
    return subprocess.run(command, env=launch_env(), input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gemma_1kv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_tiny

    out = tmp_path_factory.mktemp("gemma-1kv")
    save_tiny("gemma3", out, num_key_value_heads=1)
    return out


@pytest.mark.slow
def test_cli_generate_tensor_parallel_prints_the_single_process_text_once(gemma_1kv):
    one = lmx_cli("generate", "-m", str(gemma_1kv), "-n", "12", "-", stdin="Hello world! How are")
    two = lmx_cli(
        "generate", "-m", str(gemma_1kv), "-n", "12", "--tensor-parallel", "2", "-", stdin="Hello world! How are"
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert one.stdout.strip() and two.stdout == one.stdout  # the prompt read from stdin reached both ranks
    assert two.stderr.count("generated |") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_cli_info_tensor_parallel_shows_the_group_and_what_each_rank_holds(gemma_1kv):
    out = lmx_cli("info", "-m", str(gemma_1kv), "--tensor-parallel", "2", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    group = json.loads(out.stdout)["model"]["tensor_parallel"]  # one JSON document: rank 0's
    assert (group["size"], group["rank"], group["backend"]) == (2, 0, "ring")
    assert [r["attention"] for r in group["ranks"]] == [
        "query heads 0-1 of 4; KV head 0 of 1 (replicated)",
        "query heads 2-3 of 4; KV head 0 of 1 (replicated)",
    ]
    assert group["ranks"][1]["mlp"] == "hidden units 64-127 of 128"


# ------------------------------------------------------------------------------------------ serving


@contextlib.contextmanager
def serving(*words: str) -> Iterator[str]:
    """``lmx serve`` (its own process group) until the block ends; its base URL."""
    port = free_port_pair()
    command = [sys.executable, "-m", "lmx.cli.main", "serve", *words, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(
        command, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lmx serve exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("lmx serve did not answer /health within 240 s")
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: every process of the group
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _two_at_once(url: str) -> list[str]:
    """Two completions asked at the same time through the openai client (greedy)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none")

    def ask(prompt: str) -> str:
        r = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(ask, PROMPTS))


@pytest.mark.slow
def test_serve_tensor_parallel_answers_concurrent_openai_requests_as_one_process(gemma_1kv):
    with serving("-m", str(gemma_1kv)) as url:
        alone = _two_at_once(url)
    with serving("-m", str(gemma_1kv), "--tensor-parallel", "2") as url:
        split = _two_at_once(url)
        stats = httpx.get(url + "/health").json()
        models = httpx.get(url + "/v1/models").json()
        # what rank 0 cannot replay on the other ranks is refused with an OpenAI-shaped 400
        r = httpx.post(url + "/v1/embeddings", json={"model": "m", "input": "hi"})
    assert split == alone and all(alone)
    assert models["data"]
    # continuous batching as alone: the two requests were decoded together (beside the 2 warm-up ones)
    assert stats["requests"]["completed"] == 4 and stats["requests"]["batches"] > 0
    assert r.status_code == 400 and "tensor parallel" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ a rank that dies


def _wait_for(path: Path, procs: list[subprocess.Popen], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a rank ended early ({p.returncode}): {p.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def kill_one_of_two_ranks(tmp_path: Path, values: dict, victim: int) -> tuple[int, str]:
    """Start two ranks of the worker on ``values`` by hand, kill rank ``victim`` mid-generation, and
    return the survivor's exit code and stderr (bounded: a hang fails the test).

    The ranks are started by hand (the ring backend reads MLX_RANK and MLX_HOSTFILE), not by
    mlx.launch, which would stop the survivor itself: here the survivor has to notice on its own.
    """
    port = free_port_pair()
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), json.dumps(values)],
            # a step stuck on the dead peer inside MLX ends after LMX_TP_STEP_TIMEOUT; else the ring's error ends it
            env={**launch_env(), "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts), "LMX_TP_STEP_TIMEOUT": "10"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        for rank in (0, 1):
            _wait_for(tmp_path / f"rank{rank}.pid", procs)
        time.sleep(1.0)  # rank 0 is generating: both ranks are inside the model's collectives
        assert all(p.poll() is None for p in procs)
        procs[victim].kill()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=60)  # bounded: no hang
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return survivor.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["follower-dies", "leader-dies"])
def test_a_rank_that_dies_gives_the_survivor_a_clear_error_not_a_hang(gemma_1kv, tmp_path, victim):
    # many prompts one after another: the ranks are still generating when one is killed, however fast
    values = {"model": str(gemma_1kv), "prompts": ["Hello"] * 500, "max_tokens": 400, "tensor_parallel": 2}
    code, err = kill_one_of_two_ranks(tmp_path, values, victim)
    assert code == 3, err[-3000:]
    assert (
        f"rank {1 - victim}: GroupLostError: rank {1 - victim} of 2: another rank of the tensor-parallel group" in err
    )


@pytest.mark.slow
def test_cli_group_reports_a_killed_rank(gemma_1kv, tmp_path):
    """Under ``lmx generate --tensor-parallel 2`` (mlx.launch), killing rank 1 ends the command with an error."""
    (tmp_path / "prompt.txt").write_text("Hello")
    command = [sys.executable, "-m", "lmx.cli.main", "generate", "-m", str(gemma_1kv), "-n", "400"]
    command += ["--tensor-parallel", "2", "--prompt-file", str(tmp_path / "prompt.txt")]
    proc = subprocess.Popen(command, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rank1 = None
        deadline = time.monotonic() + 120
        while rank1 is None:
            assert proc.poll() is None and time.monotonic() < deadline
            rank1 = _rank_process(1, str(tmp_path / "prompt.txt"))
            time.sleep(0.2)
        time.sleep(3.0)  # loaded and generating
        os.kill(rank1, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "Node with rank 1 exited with code -9" in err  # mlx.launch names the dead rank, then stops rank 0
    # Rank 0 either notices the lost peer first (GroupLostError, exit 2) or is stopped by mlx.launch before it
    # does; both are reported, and rank 1 is always named as the one that did not finish.
    assert re.search(
        r"lmx: error: the tensor-parallel group of 2 failed: "
        r"(rank\(s\) 0, 1 ended without finishing|rank 0 exited with code 2; rank\(s\) 1 ended without finishing)",
        err,
    ), err[-3000:]


def _rank_process(rank: int, marker: str) -> int | None:
    """The pid of the rank ``rank`` process whose command line holds ``marker`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"MLX_RANK={rank}".encode() in environ and b"lmx.cli.main" in cmdline:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_two_ranks_split_a_quantized_gguf_dequantized_as_one_process_reads_it(gemma_1kv, tmp_path):
    gguf = tmp_path / "tiny-q8.gguf"
    made = lmx_cli("convert", str(gemma_1kv), str(gguf), "-q", "--q-bits", "8")
    assert made.returncode == 0, made.stderr[-3000:]
    values = {"model": str(gguf), "prompts": PROMPTS, "max_tokens": 12}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = run_single(tmp_path / "one", values)  # cpu_kernels=False: the Q8_0 matrices dequantized
    ranks = run_ranks(tmp_path / "two", values)
    assert ranks[0]["tokens"] == single["tokens"]
    for r in ranks:
        assert r["weights_bytes"] < 0.6 * single["weights_bytes"]
