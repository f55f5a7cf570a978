"""Summarize a py-spy raw profile (``py-spy record --native --threads --format raw``) by thread.

A raw profile is one line per distinct stack, ``frame;frame;...;leaf COUNT``, each stack's first
frame its thread. For the threads whose stacks pass through a frame containing ``--select`` (the
step encoder's ``_serve`` by default: MLX encoding each decode step's ops), this prints the
samples, the frames most often at the top of the stack (where the time is spent) and the frames
most often anywhere in it (what the time is spent under), with their shares of those samples.
Frame names are shortened to the function (MLX's C++ templates and argument lists cut).

    python benchmarks/pyspy_summary.py profile.txt --json summary.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path


def short(frame: str) -> str:
    """A frame's function, without its file, line, template arguments or parameter list."""
    name = re.sub(r" \([^()]*\)$", "", frame.strip())  # " (file:line)" / " (libfoo.so)"
    while True:  # innermost template arguments first, until none is left
        cut = re.sub(r"<[^<>]*>", "", name)
        if cut == name:
            break
        name = cut
    return re.sub(r"\(.*\)", "", name)[:120]


def summarize(path: Path, select: str, top: int) -> dict:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if body and count.isdigit():
            stacks.append((body.split(";"), int(count)))
    chosen = [(frames, n) for frames, n in stacks if any(select in f for f in frames)]
    total = sum(n for _, n in chosen)
    leaf: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    for frames, n in chosen:
        leaf[short(frames[-1])] += n
        for name in {short(f) for f in frames[1:]}:
            inclusive[name] += n

    def share(counter: collections.Counter) -> list[tuple[str, int, float]]:
        return [(name, n, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {
        "profile": str(path),
        "select": select,
        "samples_all_threads": sum(n for _, n in stacks),
        "samples_selected": total,
        "threads_selected": sorted({frames[0] for frames, _ in chosen}),
        "self": share(leaf) if total else [],
        "inclusive": share(inclusive) if total else [],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile")
    p.add_argument("--select", default="_serve", help="keep stacks through a frame containing this")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = summarize(Path(args.profile), args.select, args.top)
    print(f"{out['samples_selected']} of {out['samples_all_threads']} samples through {args.select!r}")
    for title in ("self", "inclusive"):
        print(f"-- {title}")
        for name, n, pct in out[title]:
            print(f"{pct:5.1f}% {n:7d}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
