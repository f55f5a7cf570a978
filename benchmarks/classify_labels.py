"""Seconds to classify a few texts against many labels (50, 200, 1,000) on one model.

    python benchmarks/classify_labels.py                          # bundled Gemma 3 270M, 50/200/1000 labels
    python benchmarks/classify_labels.py --labels 50,200 --n-texts 2 --json out.json
    python benchmarks/classify_labels.py --tiny gemma3            # a tiny random model (needs torch)

The labels are short topic names (one to three words, as a taxonomy has them; many share
their first word, e.g. "travel", "travel advice", "travel news"), the first N of a fixed
list of 1,000. Each label count gets one timed call over ``--n-texts`` texts (the samples of
``classify_bench.py``); there is no warm-up call besides one 4-label call before the first.
Prints one JSON line: per label count the wall seconds, CPU seconds and peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import lmx  # isort: skip  # loads OpenBLAS before mlx.core

from lmx.classify import classify

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify_bench import sample_texts

TOPICS = (  # noqa: SIM905 (a word list reads better as text)
    "sports football basketball tennis golf cycling running swimming skiing boxing "
    "politics elections government law crime courts police military war peace "
    "business finance banking stocks markets economy jobs careers startups retail "
    "technology software hardware programming security privacy internet phones computers gaming "
    "science physics chemistry biology astronomy space climate weather energy environment "
    "health medicine nutrition fitness diet sleep mental illness hospitals insurance "
    "travel hotels flights tourism camping hiking beaches cities maps trains "
    "food cooking recipes baking restaurants wine beer coffee tea desserts "
    "music movies television books art theater photography fashion design dance "
    "education schools universities teaching history language philosophy religion culture family "
    "parenting children pets dogs cats gardening housing furniture cars transport "
    "shopping fashion jewelry beauty hair weddings holidays birthdays friendship dating "
    "relationships emotions humor gossip celebrities royalty media journalism advertising marketing "
    "agriculture farming fishing forestry mining oil manufacturing construction shipping logistics "
    "aviation automotive electronics robotics chemistry mathematics statistics economics sociology "
    "psychology anthropology archaeology geography geology oceans rivers mountains deserts islands "
    "animals birds insects plants trees flowers fungi bacteria viruses genetics "
    "poetry fiction novels comics cartoons anime podcasts radio newspapers magazines blogs "
    "complaints questions requests feedback praise spam greetings apologies invitations thanks "
    "museums lottery cryptocurrency taxes pensions loans mortgages charity volunteering activism immigration labor"
).split()
FORMS = ("{}", "{} news", "{} advice", "{} question", "local {}")


def make_labels(n: int) -> list[str]:
    """The first ``n`` of 1,000 distinct short labels (every topic in each form in turn)."""
    topics = list(dict.fromkeys(TOPICS))
    labels = [form.format(t) for form in FORMS for t in topics]
    assert len(labels) >= n, f"only {len(labels)} labels"
    return labels[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", default=None, help="HF dir or .gguf (default: bundled Gemma 3 270M)")
    p.add_argument("--tiny", choices=["gemma3", "qwen3"], default=None, help="use a tiny random model instead")
    p.add_argument("--labels", default="50,200,1000", help="label counts, comma-separated (at most 1000)")
    p.add_argument("--n-texts", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON line to this file")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.labels.split(",")]
    pool, _ = sample_texts(32)
    texts = [pool[(i * 9) % 32] for i in range(args.n_texts)]  # mixed domains

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import save_tiny

            save_tiny(args.tiny, Path(tmp))
            model = tmp
        engine = lmx.load(model)
        with engine:
            info = engine.info()
            classify(engine, texts[:1], ["technical", "creative", "ethical", "casual"])  # warm-up
            rows = []
            for n in counts:
                labels = make_labels(n)
                t0, c0 = time.perf_counter(), time.process_time()
                results = classify(engine, texts, labels, batch_size=args.batch_size)
                rows.append(
                    {
                        "labels": n,
                        "texts": len(texts),
                        "seconds": round(time.perf_counter() - t0, 3),
                        "cpu_s": round(time.process_time() - c0, 3),
                        "peak_memory_mib": round(engine.metrics.peak_memory / 2**20, 1),
                        "top": [r.label for r in results],
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    line = json.dumps(
        {
            "benchmark": "classify_labels",
            "model": f"tiny random {args.tiny}" if args.tiny else info.name,
            "device": info.device,
            "machine": platform.machine(),
            "batch_size": args.batch_size,
            "results": rows,
        }
    )
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
