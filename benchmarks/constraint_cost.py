"""What a JSON-schema constraint costs a decode step: steps with and without one, batch 1 and 8.

    python benchmarks/constraint_cost.py [--model PATH] [--device cpu|gpu] [--batch 1,8]
        [--steps 64] [--rounds 3] [--xgrammar] [--json out.json]

The step loop is the scheduler's (``Decoder`` + ``sample_rows``, the next step queued before the
last one's tokens are read), run for ``--steps`` steps on B rows of one prompt, unconstrained
("plain") and with every row constrained by a typical schema (a string, an integer, an enum and
an array) ("constrained"), rounds interleaved. So that every constrained step does real grammar
work, each row replays a valid document of that schema (made once by constrained greedy
decoding): its matcher consumes the document's tokens whatever was sampled, and starts a new
document after the last one. Reported, as medians over rounds: milliseconds per step, the
overhead of the constrained step over the plain one, and the mask's CPU work alone
(``next_words``: consume each row's token and compute every row's bitmask, as ``sample_rows``
does while the device runs the step; timed without the model) as a share of a plain step.

``--xgrammar`` adds a standalone micro-benchmark of the same schema on the same vocabulary:
llguidance vs xgrammar (if it imports), compile time and per-token mask time over the document.
Prints one JSON object; ``--json`` also writes it to a file. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import lmx  # isort: skip  (loads OpenBLAS before mlx.core on Linux)
import mlx.core as mx
import numpy as np

from lmx.generate.constraints import Constraint, RowMatcher, next_words, token_bytes
from lmx.generate.options import GenerationOptions
from lmx.generate.row import RowSampler, sample_rows

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
PROMPT = "Write the user record of Ada Lovelace as JSON with name, age, role and tags:"


class ReplayMatcher(RowMatcher):
    """A row's matcher that consumes a fixed valid document (restarting after it)."""

    def __init__(self, base: RowMatcher, document: list[int]) -> None:
        super().__init__(base.ll, base.eos, base.n_vocab, base.constraint, base.executor)
        self.document, self.at = document, 0
        self.start = base.ll.deep_copy()

    def sync(self) -> None:
        if self.pending is not None:
            self.pending.item()  # wait for the step, as the real row does
            self.pending = None
            if self.at == len(self.document):
                self.ll, self.at = self.start.deep_copy(), 0
            self.consume(self.document[self.at])
            self.at += 1


def replayers(engine: lmx.Engine, batch: int, document: list[int]) -> list[ReplayMatcher]:
    make = engine.scheduler.constraints.matcher
    return [ReplayMatcher(make(Constraint.json(SCHEMA)), document) for _ in range(batch)]


def mask_cost(engine: lmx.Engine, batch: int, steps: int, document: list[int]) -> float:
    """Milliseconds per step of what ``sample_rows`` does on the CPU for ``batch`` constrained
    rows (:func:`next_words`: consume each row's token, compute every mask), without the model."""
    rows = replayers(engine, batch, document)
    token = mx.array([0])
    mx.eval(token)
    start = time.perf_counter()
    for _ in range(steps):
        for r in rows:
            r.pending = token
        next_words(rows)
    return 1000 * (time.perf_counter() - start) / steps


def run_steps(engine: lmx.Engine, batch: int, steps: int, document: list[int] | None) -> dict[str, float]:
    """Milliseconds per decode step of ``batch`` rows, over ``steps`` steps."""
    decoder = engine.scheduler.decoder
    ids = engine.tokenizer.encode(PROMPT)
    options = GenerationOptions(max_tokens=steps + 1)
    matchers = replayers(engine, batch, document) if document is not None else [None] * batch
    rows = [RowSampler(options, ids, m) for m in matchers]
    cache = engine.model.make_cache()
    logits = decoder.prefill(mx.array([ids] * batch), cache, None, engine.prefill_step_size)
    tokens, logprobs = sample_rows(logits, rows, decoder.ops)
    mx.eval(tokens, logprobs)
    decoder.refresh()
    start = time.perf_counter()
    for _ in range(steps):
        next_tokens, next_logprobs = sample_rows(decoder(tokens, cache, None), rows, decoder.ops)
        mx.async_eval(next_tokens, next_logprobs)
        tokens.tolist()  # the scheduler reads the last step's tokens while the next one runs
        tokens = next_tokens
    tokens.tolist()
    return {"step_ms": 1000 * (time.perf_counter() - start) / steps}


def micro(engine: lmx.Engine, document: list[int], xgrammar: bool) -> dict[str, Any]:
    """Compile time and per-token mask time of the schema: llguidance, and xgrammar if it imports."""
    import llguidance

    out: dict[str, Any] = {}
    compiler = engine.scheduler.constraints
    tokenizer = compiler.ll_tokenizer()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    t = time.perf_counter()
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    compile_s = time.perf_counter() - t
    words = np.zeros((compiler.n_vocab + 31) // 32, dtype=np.int32)
    times = []
    for tok in document:
        t = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        times.append(time.perf_counter() - t)
        assert words[tok // 32] >> (tok % 32) & 1, "the document is valid"
        matcher.consume_token(tok)
    out["llguidance"] = {
        "version": llguidance.__version__ if hasattr(llguidance, "__version__") else _version("llguidance"),
        "compile_ms": 1000 * compile_s,
        "mask_us_median": 1e6 * statistics.median(times),
        "mask_us_mean": 1e6 * statistics.fmean(times),
        "mask_us_max": 1e6 * max(times),
    }
    if not xgrammar:
        return out
    try:
        import xgrammar as xgr
    except ImportError as e:
        out["xgrammar"] = {"error": f"not importable: {e}"}
        return out
    table, specials = token_bytes(engine.tokenizer, compiler.n_vocab)
    special = set(specials)
    vocab = [b"" if i in special else b for i, b in enumerate(table)]  # xgrammar: "" marks a special token
    t = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=list(compiler.eos))
    info_s = time.perf_counter() - t
    grammar_compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t = time.perf_counter()
    compiled = grammar_compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - t
    xmatcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times, rejected = [], None
    for at, tok in enumerate(document):
        t = time.perf_counter()
        xmatcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - t)
        if not xmatcher.accept_token(tok):
            rejected = at  # the grammars differ: time only the tokens before it
            break
    out["xgrammar"] = {
        "rejected_document_token_at": rejected,
        "version": _version("xgrammar"),
        "tokenizer_info_ms": 1000 * info_s,
        "compile_ms": 1000 * compile_s,
        "mask_us_median": 1e6 * statistics.median(times),
        "mask_us_mean": 1e6 * statistics.fmean(times),
        "mask_us_max": 1e6 * max(times),
    }
    return out


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the bundled Gemma 3 270M)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--xgrammar", action="store_true", help="also compare llguidance with xgrammar (standalone)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()

    engine = lmx.load(args.model, device=args.device)
    t = time.perf_counter()
    engine.scheduler.constraints.ll_tokenizer()
    tokenizer_s = time.perf_counter() - t
    made = engine.generate(PROMPT, constraint=Constraint.json(SCHEMA), max_tokens=300)
    document = [t for t in made.tokens if t not in engine.eos]
    result: dict[str, Any] = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": args.device,
        "model": engine.info().name,
        "vocab": engine.model.args.vocab_size,
        "document": made.text,
        "document_tokens": len(document),
        "llguidance_tokenizer_ms": 1000 * tokenizer_s,
        "steps": args.steps,
        "rounds": args.rounds,
        "batches": {},
    }
    for batch in [int(b) for b in args.batch.split(",")]:
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "constrained": [], "mask": []}
        run_steps(engine, batch, 4, None)  # warm-up: traces and caches for this batch size
        run_steps(engine, batch, 4, document)
        for r in range(args.rounds):
            order = ["plain", "constrained"] if r % 2 == 0 else ["constrained", "plain"]
            for mode in order:
                runs[mode].append(run_steps(engine, batch, args.steps, document if mode == "constrained" else None))
            runs["mask"].append({"mask_ms": mask_cost(engine, batch, args.steps, document)})
        plain = statistics.median(x["step_ms"] for x in runs["plain"])
        constrained = statistics.median(x["step_ms"] for x in runs["constrained"])
        mask = statistics.median(x["mask_ms"] for x in runs["mask"])
        result["batches"][str(batch)] = {
            "plain_step_ms": round(plain, 3),
            "constrained_step_ms": round(constrained, 3),
            "overhead_pct": round(100 * (constrained - plain) / plain, 1),
            "mask_ms_per_step": round(mask, 3),
            "mask_pct_of_plain_step": round(100 * mask / plain, 1),
            "rounds": runs,
        }
    print(
        json.dumps(
            result["batches"]
            and {b: {k: v for k, v in x.items() if k != "rounds"} for b, x in result["batches"].items()}
        ),
        flush=True,
    )
    result["micro"] = micro(engine, document, args.xgrammar)
    engine.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
