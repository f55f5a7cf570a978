"""``lmx eval``: loss and perplexity of a model (optionally with an adapter) on JSONL data."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from lmx.cli.common import add_kv_args

    p = sub.add_parser("eval", help="loss and perplexity on JSONL data")
    p.add_argument("--model", "-m", default=None, help="HF model dir or .gguf file (default: bundled Gemma 3 270M)")
    p.add_argument("--adapter", "-a", default=None, help="LoRA adapter dir to apply")
    p.add_argument("--data", required=True, help="a .jsonl file, or a dir with test.jsonl (else valid.jsonl)")
    p.add_argument("--split", choices=["train", "valid", "test"], default=None, help="which file of a data dir")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--max-batches", type=int, default=-1, help="score only this many batches (-1: all)")
    p.add_argument("--mask-prompt", action="store_true", help="score only completion/assistant tokens")
    p.add_argument("--device", choices=["cpu", "gpu"], default=None)
    p.add_argument("--dtype", default="auto")
    add_kv_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmx.errors import InvalidOptionError
    from lmx.loading import load_model
    from lmx.models.cache import kv_quant
    from lmx.runtime import settings
    from lmx.runtime.device import choose_device
    from lmx.train.data import DatasetError, load_jsonl
    from lmx.train.evaluate import evaluate
    from lmx.train.lora import load_adapter

    if args.batch_size < 1:
        raise InvalidOptionError(f"batch_size must be >= 1, got {args.batch_size}")
    if args.max_seq_len < 2:
        raise InvalidOptionError(f"max_seq_len must be >= 2, got {args.max_seq_len}")
    data = Path(args.data)
    if data.is_dir():
        splits = [args.split] if args.split else ["test", "valid"]
        found = [data / f"{s}.jsonl" for s in splits if (data / f"{s}.jsonl").is_file()]
        if not found:
            raise DatasetError(f"no {' or '.join(s + '.jsonl' for s in splits)} in {data}")
        data = found[0]
    kv_bits = args.kv_bits if args.kv_bits is not None else settings.LMX_KV_BITS.get()
    kv_quant(kv_bits, args.kv_group_size)  # a bad value fails before the model loads
    choose_device(args.device)
    loaded = load_model(args.model, dtype=args.dtype)
    quant = kv_quant(kv_bits, args.kv_group_size, loaded.model.args.head_dim)
    if args.adapter:
        load_adapter(loaded.model, args.adapter)
    dataset = load_jsonl(data, loaded.tokenizer, mask_prompt=args.mask_prompt, max_seq_len=args.max_seq_len)
    pad = loaded.tokenizer.pad_token_id or 0
    result = evaluate(
        loaded.model, dataset, batch_size=args.batch_size, max_batches=args.max_batches, pad_id=pad, kv_quant=quant
    )
    record = {"data": str(data), "adapter": args.adapter, "kv_bits": kv_bits, **result.as_dict()}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        kv = f", KV {kv_bits}-bit" if kv_bits else ""
        print(f"{data}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} ({result.tokens} tokens{kv})")
    return 0
