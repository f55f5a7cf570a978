"""``lmx classify``: sort the texts of a .jsonl, .csv or .txt file into labels; results as JSON lines.

Every input record has an id: its ``--id-field`` value (default ``id``) when it has one,
else its line number (.jsonl, .txt) or data row number (.csv), counting from 1. With
``--output`` the run is resumable: records whose id is already in the output are skipped,
and results are flushed after every chunk, so an interrupted run loses little.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lmx.classify import DEFAULT_BATCH_SIZE, classify, validate_labels
from lmx.cli.common import add_model_args, load_engine
from lmx.errors import InvalidOptionError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "txt"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="sort texts into labels (.jsonl/.csv/.txt in, .jsonl out)")
    p.add_argument("--labels", required=True, help="comma-separated labels, e.g. technical,creative,ethical,casual")
    p.add_argument("--input", "-i", required=True, help=".jsonl, .csv (with a header row) or .txt (one text a line)")
    p.add_argument("--text-field", default=None, help="field or column holding the text (default: text); not for .txt")
    p.add_argument(
        "--id-field", default="id", help="field or column holding the id (default: id; else line/row number)"
    )
    p.add_argument("--output", "-o", default=None, help="results .jsonl, appended to and resumable (default: stdout)")
    p.add_argument("--instruction", default=None, help="what the model is told before each text")
    p.add_argument("--examples", default=None, metavar="FILE", help=".jsonl of worked examples {text, label}")
    p.add_argument("--batch-size", "-b", type=int, default=DEFAULT_BATCH_SIZE, help="texts per forward pass")
    p.add_argument("--max-text-tokens", type=int, default=None, help="cut each text to this many tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_args(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Record:
    """One input text, its id and where it was read (for error messages)."""

    id: Any
    text: str
    where: str


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    labels = validate_labels([label.strip() for label in args.labels.split(",")])
    for flag, value in (("--batch-size", args.batch_size), ("--max-text-tokens", args.max_text_tokens)):
        if value is not None and value < 1:
            raise InvalidOptionError(f"{flag} must be >= 1, got {value}")
    path = Path(args.input)
    fmt = _format_of(path, args.text_field)
    text_field = args.text_field or "text"
    examples = _read_examples(Path(args.examples)) if args.examples else None
    output = Path(args.output) if args.output else None
    if output is not None and output.resolve() == path.resolve():
        raise InvalidOptionError(f"--output {output} is the input file; write the results elsewhere")
    done = _done_ids(output, labels) if output is not None else set()

    # Read the input once before loading the model: a bad record fails fast.
    seen: dict[str, str] = {}
    todo = 0
    for rec in read_records(path, fmt, text_field, args.id_field):
        key = _key(rec.id)
        if key in seen:
            raise InvalidOptionError(
                f"{path}: {rec.where} repeats the id {rec.id!r} of {seen[key]}; ids must be unique to resume"
            )
        seen[key] = rec.where
        todo += key not in done
    skipped = len(seen) - todo

    engine = load_engine(args)
    counts: Counter[str] = Counter()
    n_done = n_truncated = 0
    chunk_size = args.batch_size * 4  # classify() sorts each chunk by length: less padding
    t0 = time.perf_counter()
    out: TextIO = output.open("a", encoding="utf-8") if output is not None else sys.stdout
    try:
        with engine, tqdm(total=todo, unit="text", file=sys.stderr, disable=args.no_progress) as bar:
            chunk: list[Record] = []
            records = (r for r in read_records(path, fmt, text_field, args.id_field) if _key(r.id) not in done)
            for rec in records:
                chunk.append(rec)
                if len(chunk) == chunk_size:
                    n_truncated += _classify_chunk(engine, chunk, labels, args, examples, out, counts)
                    n_done += len(chunk)
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                n_truncated += _classify_chunk(engine, chunk, labels, args, examples, out, counts)
                n_done += len(chunk)
                bar.update(len(chunk))
    finally:
        if out is not sys.stdout:
            out.close()
    elapsed = time.perf_counter() - t0
    rate = n_done / elapsed if elapsed > 0 else 0.0
    where = f" already in {output}" if output is not None else ""
    print(
        f"classified {n_done} texts in {elapsed:.1f} s: {rate:.1f} texts/s (batch {args.batch_size}); "
        f"skipped {skipped}{where}; {n_truncated} truncated",
        file=sys.stderr,
    )
    if counts:
        print("labels: " + ", ".join(f"{label} {counts[label]}" for label in labels), file=sys.stderr)
    return 0


def _classify_chunk(
    engine: Any,
    chunk: list[Record],
    labels: list[str],
    args: argparse.Namespace,
    examples: list[dict[str, str]] | None,
    out: TextIO,
    counts: Counter[str],
) -> int:
    results = classify(
        engine,
        [r.text for r in chunk],
        labels,
        instruction=args.instruction,
        examples=examples,
        batch_size=args.batch_size,
        max_text_tokens=args.max_text_tokens,
    )
    for rec, res in zip(chunk, results):
        line: dict[str, Any] = {"id": rec.id, "label": res.label, "scores": res.scores}
        if res.truncated:
            line["truncated"] = True
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        counts[res.label] += 1
    out.flush()
    return sum(r.truncated for r in results)


def _format_of(path: Path, text_field: str | None) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidOptionError(f"--input {path} must end in one of {', '.join(FORMATS)}, got {path.suffix!r}")
    if not path.is_file():
        raise InvalidOptionError(f"--input {path} does not exist or is not a file")
    if fmt == "txt" and text_field is not None:
        raise InvalidOptionError(f"--text-field does not apply to {path}: a .txt file holds one text per line")
    return fmt


def read_records(path: Path, fmt: str, text_field: str, id_field: str) -> Iterator[Record]:
    """The records of ``path`` in order; blank lines are skipped (ids stay line numbers).

    Raises:
        InvalidOptionError: a line is not a JSON object, the text field or column is
            missing, a text is empty or not a string, or an id is neither a string nor an int.
    """
    with path.open(encoding="utf-8-sig", newline="" if fmt == "csv" else None) as f:
        if fmt == "txt":
            for lineno, line in enumerate(f, 1):
                text = line.rstrip("\r\n")
                if text.strip():
                    yield Record(lineno, text, f"line {lineno}")
        elif fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _json_record(path, lineno, line, text_field, id_field)
        else:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if text_field not in columns:
                raise InvalidOptionError(
                    f"{path} has no column {text_field!r}; its columns: {columns} (choose one with --text-field)"
                )
            for row_no, row in enumerate(reader, 1):
                where = f"row {row_no}"
                rid: Any = row_no
                if id_field in columns:
                    rid = row[id_field]
                    if not rid:
                        raise InvalidOptionError(f"{path}: {where} has an empty {id_field!r} column")
                yield _checked(path, Record(rid, row[text_field] or "", where))


def _json_record(path: Path, lineno: int, line: str, text_field: str, id_field: str) -> Record:
    where = f"line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidOptionError(f"{path}: {where} is not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise InvalidOptionError(f"{path}: {where} must be a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        raise InvalidOptionError(
            f"{path}: {where} has no field {text_field!r}; its fields: {sorted(obj)} (choose one with --text-field)"
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise InvalidOptionError(f"{path}: {where}: field {text_field!r} must be a string, got {type(text).__name__}")
    rid = obj.get(id_field, lineno)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise InvalidOptionError(f"{path}: {where}: the id {rid!r} must be a string or an integer")
    return _checked(path, Record(rid, text, where))


def _checked(path: Path, rec: Record) -> Record:
    if not rec.text.strip():
        raise InvalidOptionError(f"{path}: {rec.where} (id {rec.id!r}) has an empty text")
    return rec


def _key(rid: Any) -> str:
    return json.dumps(rid)


def _done_ids(output: Path, labels: list[str]) -> set[str]:
    """Ids already in ``output``; an incomplete last line (an interrupted write) is cut off.

    Raises:
        InvalidOptionError: a line is not a result of this command, or the results are
            for other labels.
    """
    if not output.exists():
        return set()
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        print(f"lmx classify: dropping an incomplete last line of {output}", file=sys.stderr)
        with output.open("r+b") as f:
            f.truncate(len(complete))
    done = set()
    for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("scores"), dict):
            raise InvalidOptionError(f"--output {output}: line {lineno} is not a result of lmx classify")
        if list(obj["scores"]) != labels:
            raise InvalidOptionError(
                f"--output {output} holds results for the labels {list(obj['scores'])}, not {labels}; "
                "use the same labels to resume, or another --output"
            )
        done.add(_key(obj["id"]))
    return done


def _read_examples(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() not in (".jsonl", ".ndjson") or not path.is_file():
        raise InvalidOptionError(f"--examples {path} must be an existing .jsonl file of {{text, label}} objects")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidOptionError(f"--examples {path}: line {lineno} is not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not {"text", "label"} <= set(obj):
                raise InvalidOptionError(f"--examples {path}: line {lineno} must be an object with text and label")
            examples.append({"text": obj["text"], "label": obj["label"]})
    return examples
