"""Build a ``tokenizers.Tokenizer`` from the vocabulary a GGUF file carries in its metadata.

A GGUF file has no ``tokenizer.json``: llama.cpp stores the vocabulary under ``tokenizer.ggml.*``.
Two kinds are supported, named by ``tokenizer.ggml.model``:

- ``llama``: a SentencePiece BPE vocabulary (Gemma 3, Llama 2...) with ``scores`` and a
  ``token_type`` per token and no merges. It becomes a BPE model with byte fallback whose merges
  are recovered from the vocabulary: every token that splits into two tokens gives a merge, ranked
  by the token's position (Gemma, whose scores do not follow its merge order) or score (others).
- ``gpt2``: a byte-level BPE vocabulary (Qwen 3, Llama 3...) with its merges; the text is split by
  the regex that ``tokenizer.ggml.pre`` names before the byte-level mapping.

Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens, so both
are matched whole in text, as llama.cpp and transformers do. The backend adds no BOS/EOS of its
own (no post-processor): ``add_bos_token`` tells the caller whether to.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from lmx.errors import TokenizerError

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType)
CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer regexes of the byte-level vocabularies, keyed by ``tokenizer.ggml.pre``.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEXES = {
    "qwen2": _QWEN2_SPLIT,
    "qwen35": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
}
# Qwen's own tokenizer.json NFC-normalizes text first.
_NFC_PRE = {"qwen2", "qwen35", "deepseek-r1-qwen"}
# Llama 3's tokenizer.json takes a whole pre-token that is in the vocabulary before any merge.
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe"}


@dataclass
class GGUFTokenizerSpec:
    """A tokenizer built from GGUF metadata, with the special-token settings the file states.

    Attributes:
        backend: the ``tokenizers.Tokenizer``; it adds no special tokens itself.
        bos_token: the BOS token text, if the file names one.
        eos_tokens: tokens that end generation: the file's EOS (and EOT/EOM), then the
            architecture's turn terminators (``extra_eos_tokens``).
        pad_token: the padding token text, if any.
        add_bos_token: whether a BOS should start each encoded text (None: the file does not say).
        chat_template: the file's Jinja chat template, else the architecture's (``default_chat_template``).
    """

    backend: Tokenizer
    bos_token: str | None
    eos_tokens: list[str | int]
    pad_token: str | None
    add_bos_token: bool | None
    chat_template: str | None


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes that print as themselves keep their character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _fields_of(reader_or_fields: Any) -> Mapping[str, Any]:
    """A ``{key: value}`` mapping from our metadata dict, a header with ``.metadata``, or a ``gguf.GGUFReader``."""
    if isinstance(reader_or_fields, Mapping):
        return reader_or_fields
    metadata = getattr(reader_or_fields, "metadata", None)
    if isinstance(metadata, Mapping):
        return metadata
    fields = getattr(reader_or_fields, "fields", None)
    if isinstance(fields, Mapping):
        try:
            return {key: field.contents() for key, field in fields.items()}
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read GGUF metadata: {e}") from e
    raise TokenizerError(
        f"expected GGUF metadata (a mapping or a gguf.GGUFReader), got {type(reader_or_fields).__name__}"
    )


def _list(fields: Mapping[str, Any], key: str, item: type | tuple[type, ...], n: int | None = None) -> list[Any] | None:
    """The array ``key`` (None if absent), checked to hold ``item`` values (``n`` of them, when given)."""
    value = fields.get(key)
    if value is None:
        return None
    if hasattr(value, "tolist"):  # numpy arrays, as gguf.GGUFReader gives
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        names = item.__name__ if isinstance(item, type) else " or ".join(t.__name__ for t in item)
        raise TokenizerError(f"GGUF {key} must be an array of {names}")
    if n is not None and len(value) != n:
        raise TokenizerError(f"GGUF {key} has {len(value)} entries for {n} tokens")
    return list(value)


def _token(tokens: list[str], fields: Mapping[str, Any], name: str) -> str | None:
    """The text of the token whose id ``tokenizer.ggml.<name>_token_id`` gives."""
    token_id = fields.get(f"tokenizer.ggml.{name}_token_id")
    if token_id is None:
        return None
    if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < len(tokens):
        raise TokenizerError(f"GGUF tokenizer.ggml.{name}_token_id is {token_id!r}, outside the {len(tokens)} tokens")
    return tokens[token_id]


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        # a repeated spelling keeps its first id: later ones are unreachable by encoding anyway
        vocab.setdefault(token, i)
    if len(vocab) != len(tokens):
        logger.debug("GGUF vocabulary repeats %d token spellings", len(tokens) - len(vocab))
    return vocab


def spm_merges(tokens: list[str], vocab: dict[str, int], scores: list[float] | None) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary.

    Every way to cut a token into two tokens is a merge. Merges rank by the token's score (higher
    first) or, when ``scores`` is None, by its position; ties go to the longer left part, then the
    longer right part, then the earlier token.
    """
    merges: list[tuple[str, str]] = []
    owners: list[int] = []
    get = vocab.get
    for position, token in enumerate(tokens):
        n = len(token)
        if n < 2 or get(token) != position:
            continue
        for cut in range(n - 1, 0, -1):
            left = token[:cut]
            if left in vocab:
                right = token[cut:]
                if right in vocab:
                    merges.append((left, right))
                    owners.append(position)
    if scores is None:
        return merges  # generated in rank order: by position, then longer left part first

    def rank(i: int) -> tuple[float, int, int, int]:
        left, right = merges[i]
        return (-scores[owners[i]], -len(left), -len(right), owners[i])

    return [merges[i] for i in sorted(range(len(merges)), key=rank)]


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **options: Any) -> Tokenizer:
    try:
        return Tokenizer(models.BPE(vocab=vocab, merges=merges, **options))
    except Exception as e:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise TokenizerError(f"cannot build a BPE tokenizer from the GGUF vocabulary: {e}") from e


def _sentencepiece(fields: Mapping[str, Any], tokens: list[str], arch: str) -> tuple[Tokenizer, list[str]]:
    # Whitespace-run tokens are stored with real spaces, but the normalizer turns text spaces into "▁".
    spelled = [t.replace(" ", "▁") if " " in t and not t.strip() else t for t in tokens]
    vocab = _vocab(spelled)
    gemma = arch.startswith("gemma")
    scores = None if gemma else _list(fields, "tokenizer.ggml.scores", (int, float), len(tokens))
    unk = _token(spelled, fields, "unknown") or ("<unk>" if "<unk>" in vocab else None)
    backend = _bpe(vocab, spm_merges(spelled, vocab, scores), unk_token=unk, fuse_unk=True, byte_fallback=True)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        # Gemma prepends no space whatever add_space_prefix says; spaces become "▁" up front. (The
        # split on " " after that is a no-op kept to mirror Gemma's own tokenizer.json.)
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend, spelled


def _byte_level(fields: Mapping[str, Any], tokens: list[str]) -> tuple[Tokenizer, list[str]]:
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    # llama.cpp writes tokens in the byte alphabet already; respell any that are not
    spelled = [t if set(t) <= chars else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    merges_raw = _list(fields, "tokenizer.ggml.merges", str)
    if merges_raw is None:
        raise TokenizerError("GGUF byte-level (gpt2) vocabulary has no tokenizer.ggml.merges")
    merges = []
    for i, merge in enumerate(merges_raw):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"GGUF merge {i} is {merge!r}; expected two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    pre = fields.get("tokenizer.ggml.pre") or "default"
    if not isinstance(pre, str):
        raise TokenizerError(f"GGUF tokenizer.ggml.pre must be a string, got {pre!r}")
    backend = _bpe(_vocab(spelled), merges, ignore_merges=pre in _IGNORE_MERGES_PRE)
    split = SPLIT_REGEXES.get(pre)
    if split is None:
        if pre not in ("default", "gpt2", "gpt-2"):
            logger.warning("unknown GGUF pre-tokenizer %r: splitting text with GPT-2's regex", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _NFC_PRE:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _add_typed_tokens(
    backend: Tokenizer, tokens: list[str], spelled: list[str], types: list[int] | None, specials: list[str | None]
) -> None:
    """Match CONTROL tokens (and the named special tokens) whole as special, USER_DEFINED ones as plain."""
    # A token whose stored text had to be respelled is not found in text by its stored spelling (and
    # adding that spelling would grow the vocabulary), so it is left to the model.
    kept = {t for t, s in zip(tokens, spelled) if t == s and t}
    special, plain = {t for t in specials if t in kept}, []
    for token, token_type in zip(tokens, types or ()):
        if token in kept and token_type == CONTROL:
            special.add(token)
        elif token in kept and token_type == USER_DEFINED:
            plain.append(token)
    ordered = [t for t in dict.fromkeys(tokens) if t in special]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])


def tokenizer_from_gguf(
    reader_or_fields: Any, *, default_chat_template: str | None = None, extra_eos_tokens: Sequence[str] = ()
) -> GGUFTokenizerSpec:
    """Build the tokenizer a GGUF file describes.

    Args:
        reader_or_fields: GGUF metadata as ``{key: value}`` (``lmx.io.gguf.read_header(...).metadata``),
            an object with such a ``.metadata``, or a ``gguf.GGUFReader``.
        default_chat_template: the template when the file has none (the architecture's ``CHAT_TEMPLATE``).
        extra_eos_tokens: turn terminators that also end generation, where the vocabulary has them
            (the architecture's ``EXTRA_EOS_TOKENS``, as its generation_config.json lists them).

    Returns:
        The tokenizer and its special-token settings.

    Raises:
        TokenizerError: the vocabulary is missing, malformed, or of an unsupported kind.
    """
    fields = _fields_of(reader_or_fields)
    kind = fields.get("tokenizer.ggml.model")
    tokens = _list(fields, "tokenizer.ggml.tokens", str)
    if not tokens:
        raise TokenizerError("GGUF file holds no vocabulary (tokenizer.ggml.tokens)")
    arch = str(fields.get("general.architecture") or "")
    if kind == "llama":
        backend, spelled = _sentencepiece(fields, tokens, arch)
    elif kind == "gpt2":
        backend, spelled = _byte_level(fields, tokens)
    else:
        raise TokenizerError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: 'llama' (SentencePiece), 'gpt2'"
        )
    types = _list(fields, "tokenizer.ggml.token_type", int, len(tokens))
    names = {name: _token(tokens, fields, name) for name in ("bos", "eos", "eot", "eom", "padding", "unknown")}
    _add_typed_tokens(backend, tokens, spelled, types, list(names.values()))

    vocab = set(tokens)
    eos = [names["eos"], names["eot"], names["eom"], *(t for t in extra_eos_tokens if t in vocab)]
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    if add_bos is None and kind == "llama":
        add_bos = True  # llama.cpp's default for a SentencePiece vocabulary that does not say
    template = fields.get("tokenizer.chat_template") or default_chat_template
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"GGUF tokenizer.chat_template must be a string, got {type(template).__name__}")
    return GGUFTokenizerSpec(
        backend=backend,
        bos_token=names["bos"],
        eos_tokens=list(dict.fromkeys(t for t in eos if t is not None)),
        pad_token=names["padding"],
        add_bos_token=None if add_bos is None else bool(add_bos),
        chat_template=template,
    )


__all__ = [
    "GGUFTokenizerSpec",
    "spm_merges",
    "tokenizer_from_gguf",
]
