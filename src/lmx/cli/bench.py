"""``lmx bench``: load time, prefill and decode tok/s, time to first token and peak memory."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from lmx.bench import CONFIGS
    from lmx.cli.common import add_kv_args

    p = sub.add_parser("bench", help="measure load time, prefill/decode speed, first-token latency and memory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", "-m", default=None, help="HF model dir or .gguf file (default: bundled Gemma 3 270M)")
    src.add_argument("--config", default=None, choices=list(CONFIGS), help="random weights of a published shape")
    p.add_argument("--layers", type=int, default=None, help="with --config: cut the model to this many layers")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed runs (after one warm-up); medians are reported")
    p.add_argument(
        "--prefill-step-size", type=int, default=None, help="prompt chunk (default: 2048 on a GPU, 128 on the CPU)"
    )
    p.add_argument("--compile", action="store_true", help="decode with the compiled step (off by default, as measured)")
    p.add_argument("--quantize", type=int, default=None, choices=[4, 8], help="quantize weights to this many bits")
    add_kv_args(p)
    p.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: LMX_DEVICE, else GPU if present")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    p.add_argument(
        "--speculative",
        choices=["prompt-lookup", "draft-model"],
        default=None,
        help="instead: greedy chat requests that copy from their prompt, plain vs speculative, interleaved "
        "(tokens/s, acceptance, identical output)",
    )
    p.add_argument("--draft-model", default=None, help="with --speculative draft-model: the draft model's path")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="with --speculative: tokens drafted per pass")
    p.add_argument("--prompt-lookup-ngram", type=int, default=3, help="with --speculative prompt-lookup")
    p.add_argument(
        "--against",
        choices=["llama.cpp", "mlx-lm"],
        default=None,
        help="instead: lmx against llama.cpp (llama-cpp-python) on the same GGUF file on the CPU, each "
        "measurement in its own process; or against mlx-lm on the same weights (--config or an HF directory) "
        "and device, in one process; interleaved rounds (decode and prefill tok/s, the ratios)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="with --against: interleaved rounds (default: 5 llama.cpp, 3 mlx-lm)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="with --against llama.cpp: its threads (default: lmx's, the cores)"
    )
    p.add_argument(
        "--roofline",
        action="store_true",
        help="with --against mlx-lm: measure the device's copy bandwidth and report decode against it",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmx.bench import run_benchmark
    from lmx.runtime import settings

    if args.speculative is not None:
        return run_speculative(args)
    if args.against is not None:
        return run_against(args)
    model = args.model  # neither a model nor a config: the bundled default, as `lmx run` loads it

    def progress(stats: object) -> None:
        logger.debug("run: %s", stats)  # shown with lmx -v; the summary below is the output

    result = run_benchmark(
        model,
        config=args.config,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        batch=args.batch,
        repeat=args.repeat,
        device=args.device,
        dtype=args.dtype,
        num_layers=args.layers,
        quantize=args.quantize,
        prefill_step_size=args.prefill_step_size,
        compile=args.compile,
        on_run=progress,
        kv_bits=args.kv_bits if args.kv_bits is not None else settings.LMX_KV_BITS.get(),
        kv_group_size=args.kv_group_size,
    )
    data = result.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    mib = 2**20
    quant = f", q{data['quantization']}" if data["quantization"] else ""
    kv = f", KV {data['kv_bits']}-bit (group {data['kv_group_size']})" if data["kv_bits"] else ""
    print(f"model:      {data['model']} ({data['device']}, {data['dtype']}{quant}{kv})")
    print(
        f"shape:      batch {data['batch']}, {data['prompt_tokens']} prompt tokens, {data['gen_tokens']} generated,"
        f" {data['repeat']} runs (medians)"
    )
    print(f"load:       {data['load_time_s']:.2f} s")
    print(
        f"prefill:    {data['prefill_tokens_per_s']:.1f} tok/s (first token {data['time_to_first_token_s'] * 1e3:.0f} ms)"
    )
    print(f"decode:     {data['decode_tokens_per_s']:.1f} tok/s")
    print(
        f"memory:     peak {data['peak_memory_bytes'] / mib:.0f} MiB = weights {data['weights_bytes'] / mib:.0f}"
        f" + KV {data['kv_cache_bytes'] / mib:.0f} MiB {data['memory_overhead']:+.1%}"
    )
    return 0


def run_speculative(args: argparse.Namespace) -> int:
    from lmx.bench_speculative import run_speculative_benchmark

    if args.config is not None:
        print("lmx bench --speculative needs a real model (--model or the default), not --config", file=sys.stderr)
        return 2

    def progress(r: object) -> None:
        logger.debug("run: %s", r)

    result = run_speculative_benchmark(
        args.model,
        mode=args.speculative,
        draft_model=args.draft_model,
        num_draft_tokens=args.num_draft_tokens,
        prompt_lookup_ngram=args.prompt_lookup_ngram,
        gen_tokens=args.gen_tokens,
        repeat=args.repeat,
        device=args.device,
        dtype=args.dtype,
        on_run=progress,
    )
    data = result.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    draft = f", draft {data['draft_model']}" if data["draft_model"] else ""
    print(f"model:      {data['model']} ({data['device']}{draft})")
    print(
        f"shape:      {data['mode']}, {data['num_draft_tokens']} draft tokens, n-gram {data['prompt_lookup_ngram']},"
        f" up to {data['gen_tokens']} tokens, {data['repeat']} runs per task (medians)"
    )
    print("task               plain tok/s  spec tok/s  speed-up (pairs, total)  acceptance  tokens/pass  identical")
    for name, s in [*data["tasks"].items(), ("all", data["all"])]:
        print(
            f"{name:<18} {s['plain_tokens_per_s']:>11.1f} {s['speculative_tokens_per_s']:>11.1f}"
            f" {s['speedup']:>13.2f}x {s['speedup_total_time']:>8.2f}x {s['acceptance_rate']:>11.0%}"
            f" {s['tokens_per_verify_pass']:>12.2f}  {'yes' if s['identical'] else 'NO'}"
        )
    return 0


def _log_round(run: dict) -> None:
    """One measurement of ``--against`` as it comes (shown with ``lmx -v``)."""
    logger.info(
        "round %d %s: decode %.1f tok/s, prefill %.1f tok/s",
        run["round"],
        run["engine"],
        run["decode_tokens_per_s"],
        run["prefill_tokens_per_s"],
    )


def run_against(args: argparse.Namespace) -> int:
    from lmx.bench_anchor import run_anchor

    if args.against == "mlx-lm":
        return run_against_mlx_lm(args)
    if args.config is not None:
        print("lmx bench --against needs a GGUF file (--model or the default), not --config", file=sys.stderr)
        return 2

    result = run_anchor(
        args.model,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        rounds=args.rounds or 5,
        threads=args.threads,
        on_run=_log_round,
    )
    data = result.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"model:      {data['model']} (cpu, the same file for both; llama.cpp on {data['threads']} threads)")
    print(
        f"shape:      {data['prompt_tokens']} prompt tokens, {data['gen_tokens']} generated, {data['rounds']} rounds,"
        " each run in its own process, the order rotating (medians)"
    )
    _print_medians(data, "llama.cpp", data["lmx_over_llama_cpp"], ms_digits=0)
    return 0


def _print_medians(data: dict, anchor: str, ratio: dict, ms_digits: int) -> None:
    """An ``--against`` result's table of medians (and roofline, where measured) and its ratios."""
    roofline = data.get("roofline")
    print("engine      decode tok/s  prefill tok/s  first token ms" + ("  roofline" if roofline else ""))
    for engine, m in data["medians"].items():
        roof = f"  {roofline[engine]:8.1%}" if roofline else ""
        print(
            f"{engine:<11} {m['decode_tokens_per_s']:>12.1f} {m['prefill_tokens_per_s']:>14.1f}"
            f" {m['time_to_first_token_s'] * 1e3:>15.{ms_digits}f}{roof}"
        )
    won = data["rounds_lmx_faster"]
    print(
        f"lmx / {anchor}: decode {ratio['decode_tokens_per_s']:.2f}x (faster in {won['decode_tokens_per_s']} of"
        f" {data['rounds']} rounds), prefill {ratio['prefill_tokens_per_s']:.2f}x (faster in"
        f" {won['prefill_tokens_per_s']} of {data['rounds']})"
    )


def run_against_mlx_lm(args: argparse.Namespace) -> int:
    from lmx.bench_mlx_lm import run_against_mlx_lm as run

    result = run(
        args.model,
        config=args.config,
        quantize=args.quantize,
        device=args.device,
        dtype=args.dtype,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        rounds=args.rounds or 3,
        roofline=args.roofline,
        on_run=_log_round,
    )
    data = result.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    quant = f", q{data['quantization']}" if data["quantization"] else ""
    print(f"model:      {data['model']} ({data['device']}{quant}, the same weight arrays for both, one process)")
    print(
        f"shape:      {data['prompt_tokens']} prompt tokens, {data['gen_tokens']} generated, {data['rounds']} rounds,"
        f" the order rotating (medians); greedy tokens alike: the first {data['same_greedy_tokens']}"
    )
    _print_medians(data, "mlx-lm", data["lmx_over_mlx_lm"], ms_digits=1)
    if "copy_bandwidth_bytes_per_s" in data:
        print(
            f"copy bandwidth {data['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, weights {data['weights_bytes'] / 2**30:.2f} GiB"
        )
    return 0
