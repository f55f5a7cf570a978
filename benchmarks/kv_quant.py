"""Quantized KV cache (issue 17 part 4): perplexity, KV bytes and decode speed, float vs 8-bit vs 4-bit.

Every figure is one ``lmx`` command run in a fresh process, so each is reproduced by that command alone:

- perplexity: ``lmx eval --kv-bits {none,8,4}`` of the bundled Gemma 3 270M on a fixed text (the GPL-3
  text Debian and Ubuntu ship at /usr/share/common-licenses/GPL-3, its sha256 recorded), cut into
  pieces of about 2,000 tokens, each scored as one sequence (every token attends to all the keys and
  values before it, as a quantized cache holds them);
- KV bytes and decode speed at long context: ``lmx bench --prompt-tokens N --kv-bits {none,8,4}``
  (``kv_cache_bytes`` is the storage the caches hold at the end, measured, not computed); float and
  8-bit runs alternate, round after round, so a machine whose load changes treats both alike.

Usage::

    python benchmarks/kv_quant.py --part ppl > benchmarks/kv_quant_ppl_cpu.json
    python benchmarks/kv_quant.py --part decode --context 4096 --rounds 3 > benchmarks/kv_quant_decode_cpu_4k.json
    python benchmarks/kv_quant.py --part decode --context 8192 --rounds 1 --bits none,8,4 > ...

``--part steps`` times decode steps in one process instead, finely interleaved: the model is loaded
once, one float and one 8-bit cache are prefilled with the same random prompt of ``--context``
tokens, then (after one untimed round) each round times ``--gen`` greedy decode steps (the engine's eager step,
``lmx.generate.step.Decoder``) on one cache, then on the other, alternating which goes first; a
shared machine whose load changes from second to second then weighs on both alike::

    python benchmarks/kv_quant.py --part steps --context 4096 --gen 16 --rounds 12 --bits none,8

Prints one JSON object; ``uptime``'s load average is recorded before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TEXT = Path("/usr/share/common-licenses/GPL-3")
PIECE_CHARS = 8000  # about 2,000 Gemma tokens of this text


def _lmx(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lmx.cli.main", *args, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy()).stdout
    return json.loads(out)


EXTRA: list[str] = []  # --bench-args: more `lmx bench` arguments (a GPU run: --config gemma3-270m --device gpu)


def _bits_arg(bits: str) -> list[str]:
    return [] if bits == "none" else ["--kv-bits", bits]


def perplexity(bits: list[str], model: list[str] = ()) -> dict:
    """``lmx eval`` of the fixed text's pieces per KV width; ``model``: e.g. ``["--model", PATH]``."""
    text = TEXT.read_text()
    pieces = [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
    pieces = [p for p in pieces if len(p) > PIECE_CHARS // 2]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.jsonl"
        data.write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces))
        runs = {
            b: _lmx(["eval", *model, "--data", str(data), "--batch-size", "1", "--max-seq-len", "4096", *_bits_arg(b)])
            for b in bits
        }
    base = runs.get("none")
    for run in runs.values():
        run.pop("data", None)
        if base is not None:
            run["perplexity_change"] = run["perplexity"] / base["perplexity"] - 1.0
    return {
        "text": str(TEXT),
        "text_sha256": hashlib.sha256(TEXT.read_bytes()).hexdigest(),
        "pieces": len(pieces),
        "piece_chars": PIECE_CHARS,
        "command": "lmx eval --data <pieces>.jsonl --batch-size 1 --max-seq-len 4096 [--kv-bits B] --json",
        "runs": runs,
    }


def decode(bits: list[str], context: int, gen: int, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {b: [] for b in bits}
    for _ in range(rounds):
        for b in bits:
            r = _lmx(
                [
                    "bench",
                    "--prompt-tokens",
                    str(context),
                    "--gen-tokens",
                    str(gen),
                    "--repeat",
                    "1",
                    *_bits_arg(b),
                    *EXTRA,
                ]
            )
            runs[b].append(
                {
                    k: r[k]
                    for k in (
                        "decode_tokens_per_s",
                        "prefill_tokens_per_s",
                        "kv_cache_bytes",
                        "peak_memory_bytes",
                        "weights_bytes",
                    )
                }
            )
            print(f"{b}: {runs[b][-1]}", file=sys.stderr)
    summary = {
        b: {
            "decode_tok_s_median": statistics.median(r["decode_tokens_per_s"] for r in rs),
            "prefill_tok_s_median": statistics.median(r["prefill_tokens_per_s"] for r in rs),
            "kv_cache_bytes": rs[0]["kv_cache_bytes"],
        }
        for b, rs in runs.items()
    }
    if "none" in summary:
        for s in summary.values():
            s["kv_bytes_ratio"] = s["kv_cache_bytes"] / summary["none"]["kv_cache_bytes"]
            s["decode_change"] = s["decode_tok_s_median"] / summary["none"]["decode_tok_s_median"] - 1.0
    return {
        "context": context,
        "gen_tokens": gen,
        "rounds": rounds,
        "order": "interleaved: each round runs every setting once, in the order given",
        "command": f"lmx bench --prompt-tokens {context} --gen-tokens {gen} --repeat 1 [--kv-bits B] --json",
        "summary": summary,
        "runs": runs,
    }


def steps(bits: list[str], context: int, gen: int, rounds: int) -> dict:
    import time

    # lmx first: it routes MLX's BLAS to OpenBLAS before mlx.core loads
    import lmx  # noqa: F401 # isort: skip
    import mlx.core as mx

    from lmx.generate.step import Decoder, DecodeState
    from lmx.loading import load_model
    from lmx.models.cache import kv_quant

    loaded = load_model(None)
    model = loaded.model
    decoder = Decoder(DecodeState(model, loaded.profile))
    prompt = mx.random.randint(0, int(loaded.config["vocab_size"]), (1, context), key=mx.random.key(0))
    state = {}
    for b in bits:
        caches = model.make_cache(kv_quant(None if b == "none" else int(b), 64, model.args.head_dim))
        logits = decoder.prefill(prompt, caches, None, loaded.profile.prefill_step_size)
        token = mx.argmax(logits, axis=-1)
        mx.eval(token, [c.state for c in caches])
        state[b] = (caches, token)
    times: dict[str, list[float]] = {b: [] for b in bits}
    for r in range(-1, rounds):  # round -1: a warm-up (first calls), not timed
        for b in bits if r % 2 == 0 else bits[::-1]:
            caches, token = state[b]
            t0 = time.perf_counter()
            for _ in range(gen):
                token = mx.argmax(decoder(token, caches, None), axis=-1)
                token.tolist()  # the host read of every step, as the engine makes it
            if r >= 0:
                times[b].append(gen / (time.perf_counter() - t0))
            state[b] = (caches, token)
    summary = {
        b: {
            "decode_tok_s_median": statistics.median(ts),
            "kv_cache_bytes": sum(c.nbytes for c in state[b][0]),
            "context_at_end": state[b][0][0].offset,
        }
        for b, ts in times.items()
    }
    if "none" in summary:
        for s in summary.values():
            s["decode_change"] = s["decode_tok_s_median"] / summary["none"]["decode_tok_s_median"] - 1.0
    return {
        "context": context,
        "steps_per_round": gen,
        "rounds": rounds,
        "profile": str(loaded.profile),
        "order": "one process; each round times every setting, the order reversed every other round",
        "command": f"python benchmarks/kv_quant.py --part steps --context {context} --gen {gen} --rounds {rounds}",
        "summary": summary,
        "decode_tok_s": times,
    }


def attention(lengths: list[int], rounds: int) -> dict:
    """One layer's one-query attention of Gemma 3 270M's shape (4 query heads, 1 key head of 256) on
    lmx's CPU kernels: float32 keys/values vs 8- and 4-bit, calls alternating round by round; warm
    (the same keys and values call after call: they stay in the CPU's caches) and cold (128 MiB
    touched before each call, as a decode step's weights pass between two attention calls)."""
    import time

    # lmx first: it routes MLX's BLAS to OpenBLAS before mlx.core loads
    import lmx  # noqa: F401 # isort: skip
    import mlx.core as mx

    from lmx.kernels import kernels

    k = kernels()
    assert k is not None, "lmx's CPU kernels are not built"
    out: dict = {}
    flush = mx.zeros((32 * 2**20,))  # 128 MiB: evicts the keys and values from the CPU's caches
    mx.eval(flush)
    for n in lengths:
        q = mx.random.normal((1, 4, 1, 256))
        keys, values = mx.random.normal((1, 1, n, 256)), mx.random.normal((1, 1, n, 256))
        calls = {"none": lambda q=q, keys=keys, values=values: k.attention(q, keys, values, 0.0625, False)}
        for bits in (8, 4):
            kq, vq = mx.quantize(keys, group_size=64, bits=bits), mx.quantize(values, group_size=64, bits=bits)
            mx.eval(kq, vq)
            calls[str(bits)] = lambda q=q, kq=kq, vq=vq, bits=bits: k.quantized_attention(
                q, *kq, *vq, 0.0625, False, 64, bits
            )
        mx.eval(q, keys, values)
        for cold in (False, True):
            times: dict[str, list[float]] = {b: [] for b in calls}
            for r in range(rounds):
                for b, fn in calls.items() if r % 2 == 0 else reversed(calls.items()):
                    spent = 0.0
                    for _ in range(20):
                        if cold:  # as in a decode step, where the weights stream through between two layers
                            mx.eval(flush + 1)
                        t0 = time.perf_counter()
                        mx.eval(fn())
                        spent += time.perf_counter() - t0
                    times[b].append(spent / 20 * 1e3)
            out[f"{n}{' cold' if cold else ''}"] = {b: statistics.median(ts) for b, ts in times.items()}
    return {
        "unit": "ms per call, median of rounds of 20 calls",
        "command": "python benchmarks/kv_quant.py --part attention",
        "rounds": rounds,
        "ms": out,
    }


def check() -> dict:
    """``MlxOps.quantized_attention`` (``mx.quantized_matmul``, the path off lmx's CPU kernels: a GPU)
    against MLX's attention over the dequantized keys and values, on the default device."""
    # lmx first: it routes MLX's BLAS to OpenBLAS before mlx.core loads
    import lmx  # noqa: F401 # isort: skip
    import mlx.core as mx

    from lmx.runtime.ops import MLX_OPS

    out = {"device": str(mx.default_device())}
    for dtype in (mx.float32, mx.bfloat16):
        for bits in (8, 4):
            for lq, mask in ((1, None), (5, "causal"), (3, "array")):
                q = mx.random.normal((2, 8, lq, 256), key=mx.random.key(1)).astype(dtype)
                kv = mx.random.normal((2, 2, 700, 256), key=mx.random.key(2)).astype(dtype)
                kq = mx.quantize(kv, group_size=64, bits=bits)
                vq = mx.quantize(kv * 0.5 + 1, group_size=64, bits=bits)
                m = mask
                if mask == "array":
                    m = mx.random.uniform(shape=(2, 1, lq, 700), key=mx.random.key(3)) > 0.3
                keys = mx.dequantize(*kq, group_size=64, bits=bits)
                values = mx.dequantize(*vq, group_size=64, bits=bits)
                want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.0625, mask=m)
                got = MLX_OPS.quantized_attention(q, tuple(kq), tuple(vq), 0.0625, m, 64, bits)
                err = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
                out[f"{dtype} {bits}-bit lq={lq} mask={mask}"] = err
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ppl", "decode", "steps", "attention", "check"], required=True)
    parser.add_argument("--bits", default="none,8,4", help="settings, comma-separated: none, 8, 4")
    parser.add_argument("--context", type=int, default=4096, help="decode: prompt tokens before decoding")
    parser.add_argument("--gen", type=int, default=64, help="decode: tokens generated per run")
    parser.add_argument("--rounds", type=int, default=3, help="decode: rounds of every setting")
    parser.add_argument("--bench-args", default="", help="decode: more lmx bench arguments, space-separated")
    args = parser.parse_args()
    bits = args.bits.split(",")
    EXTRA.extend(args.bench_args.split())
    load_before = os.getloadavg()
    if args.part == "ppl":
        result = perplexity(bits)
    elif args.part == "decode":
        result = decode(bits, args.context, args.gen, args.rounds)
    elif args.part == "steps":
        result = steps(bits, args.context, args.gen, args.rounds)
    elif args.part == "attention":
        result = attention([768, 4096, 8192], args.rounds)
    else:
        result = check()
    result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
