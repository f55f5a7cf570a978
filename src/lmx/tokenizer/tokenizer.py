"""The :class:`Tokenizer`: encode, decode and chat templates over a ``tokenizers`` backend.

:func:`load_tokenizer` builds one from a Hugging Face model directory (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``, ``special_tokens_map.json``), with the
end-of-sequence ids gathered from the tokenizer, ``config.json`` and ``generation_config.json``.
"""

from __future__ import annotations

import json
import operator
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers

from lmx.errors import ConfigError, LmxError, TokenizerError
from lmx.tokenizer.chat import compile_chat_template, load_chat_templates, render_chat_template
from lmx.tokenizer.detokenizer import StreamingDetokenizer
from lmx.tokenizer.sandbox import TemplateLimits


def _post_processor_prefix(backend: tokenizers.Tokenizer) -> int | None:
    """The id the backend's post-processor puts before the text (its BOS), if it adds one."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain:
        return full[0]
    return None


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of the ``<0xNN>`` byte tokens, when the decoder turns them back into bytes."""
    ids = {b: backend.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    probe = ids[0x41]
    # Without a ByteFallback decoder "<0x41>" decodes to itself and is an ordinary token.
    if probe is None or backend.decode([probe], skip_special_tokens=False) != "A":
        return frozenset()
    return frozenset(i for i in ids.values() if i is not None)


class Tokenizer:
    """A Hugging Face ``tokenizers`` tokenizer plus the special tokens and chat template of a model.

    Args:
        backend: The ``tokenizers.Tokenizer`` (from ``tokenizer.json``).
        bos_token: The beginning-of-sequence token. When ``None`` and the backend's
            post-processor prepends a token, that token is taken as BOS.
        eos_tokens: Tokens (strings or ids) that end generation. The first string, or else the
            first id, is the ``eos_token`` that chat templates see.
        pad_token: The padding token, if any.
        add_bos_token: Whether :meth:`encode` prepends BOS. ``None`` detects it from the
            backend's post-processor.
        chat_template: Jinja source of the default chat template.
        name: The model name, used in error messages.
        chat_templates: Further named templates (``"tool_use"`` is picked when tools are passed).

    Attributes:
        template_limits: The :class:`~lmx.tokenizer.TemplateLimits` (time, output size, depth)
            every chat template render runs under unless a call passes its own; assign a new
            one to change them for every later render.

    Raises:
        TokenizerError: a special token is not in the vocabulary, an id is out of range,
            ``add_bos_token`` is set without a BOS token, or a template is not a string.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_tokens: Iterable[str | int] = (),
        pad_token: str | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        name: str = "",
        chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TokenizerError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        self.backend = backend
        self.name = name
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self._id_limit = max([self.vocab_size, *(i + 1 for i in added)])
        self.special_token_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)
        self.byte_fallback_ids: frozenset[int] = _byte_fallback_ids(backend)

        self.bos_token = bos_token
        self.bos_token_id: int | None = None if bos_token is None else self._require_id(bos_token, "bos_token")
        prefix = _post_processor_prefix(backend)
        if self.bos_token_id is None and prefix is not None:
            self.bos_token_id, self.bos_token = prefix, backend.id_to_token(prefix)
        if add_bos_token is None:
            add_bos_token = prefix is not None and prefix == self.bos_token_id
        if add_bos_token and self.bos_token_id is None:
            raise TokenizerError(f"add_bos_token is set for {self._label} but it has no bos_token")
        self.add_bos_token = bool(add_bos_token)

        self.pad_token = pad_token
        self.pad_token_id: int | None = None if pad_token is None else self._require_id(pad_token, "pad_token")

        eos_ids: list[int] = []
        eos_token: str | None = None
        for tok in eos_tokens:
            if isinstance(tok, str):
                eos_ids.append(self._require_id(tok, "eos token"))
                eos_token = eos_token or tok
            else:
                eos_ids.append(self.check_id(tok))
        if eos_token is None and eos_ids:
            eos_token = backend.id_to_token(eos_ids[0])
        self.eos_token = eos_token
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)

        templates = dict(chat_templates or {})
        if chat_template is not None:
            templates["default"] = chat_template
        for key, source in templates.items():
            if not isinstance(source, str):
                raise TokenizerError(
                    f"chat template {key!r} of {self._label} must be a str, got {type(source).__name__}"
                )
        self.chat_templates: Mapping[str, str] = types.MappingProxyType(templates)
        self.chat_template: str | None = templates.get("default")
        self._compiled: dict[str, jinja2.Template] = {}
        self.template_limits = TemplateLimits()

    @property
    def _label(self) -> str:
        return f"model {self.name!r}" if self.name else "this tokenizer"

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_ids={sorted(self.eos_token_ids)}, add_bos_token={self.add_bos_token})"
        )

    def _require_id(self, token: str, what: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{what} {token!r} of {self._label} is not in its vocabulary")
        return token_id

    def check_id(self, token_id: Any) -> int:
        """A token id as an int, checked (ids past the vocabulary pass: they decode to no text).

        Raises:
            TokenizerError: not an int, or negative.
        """
        try:
            value = operator.index(token_id)
        except TypeError:
            raise TokenizerError(f"token ids must be ints, got {type(token_id).__name__}: {token_id!r:.40}") from None
        # Ids past the vocabulary are allowed: models pad their embedding (Gemma 3: 262,208 rows
        # for 262,144 tokens), and such an id, if ever sampled, decodes to no text.
        if not 0 <= value < 2**32:  # tokenizers takes u32 ids; a huge int would be a raw OverflowError
            shown = value if value.bit_length() < 128 else f"an integer of {value.bit_length()} bits"
            allowed = ">= 0" if value < 0 else "< 2**32"
            raise TokenizerError(f"token ids must be {allowed}, got {shown} for {self._label}")
        return value

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that chat templates see (``bos_token``, ``eos_token``, ``pad_token``)."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        return {key: value for key, value in named.items() if value is not None}

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text map to their own ids.

        Args:
            text: The text to encode.
            add_special_tokens: Prepend BOS when the tokenizer adds one (see ``add_bos_token``).

        Returns:
            The token ids.

        Raises:
            TokenizerError: ``text`` is not a string or cannot be encoded (a lone surrogate).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError as e:
            raise TokenizerError(f"cannot encode text (is it valid Unicode, without lone surrogates?): {e}") from e
        if add_special_tokens and self.add_bos_token:
            assert self.bos_token_id is not None
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``.

        Args:
            ids: Token ids.
            skip_special_tokens: Leave special tokens (BOS, EOS, turn markers) out of the text.

        Returns:
            The decoded text; bytes that are not valid UTF-8 become U+FFFD.

        Raises:
            TokenizerError: an id is not an int or is out of range.
        """
        checked = [self.check_id(i) for i in ids]
        return self.backend.decode(checked, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, id: int) -> str | None:
        """The vocabulary string of ``id``, or ``None`` for an id outside the vocabulary."""
        value = operator.index(id)
        return self.backend.id_to_token(value) if 0 <= value < self._id_limit else None

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or ``None`` if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def _select_template(self, chat_template: str | None, tools: list[Any] | None) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is not None:
            return self.chat_template
        named = (
            f" (named templates: {sorted(self.chat_templates)}, none called 'default')" if self.chat_templates else ""
        )
        raise TokenizerError(
            f"{self._label} has no chat template{named}; pass one with chat_template=<Jinja source> "
            "or put a chat_template.jinja file in the model directory"
        )

    def template_source(self, chat_template: str | None = None, tools: list[Any] | None = None) -> str:
        """The Jinja source :meth:`apply_chat_template` would render with these arguments.

        Raises:
            TokenizerError: the tokenizer has no chat template and none was given.
        """
        return self._select_template(chat_template, tools)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        chat_template: str | None = None,
        template_limits: TemplateLimits | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation into prompt text with the model's chat template.

        Rendering matches ``transformers``' ``apply_chat_template(..., tokenize=False)``.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            add_generation_prompt: End with the header that opens the assistant's turn.
            tools: JSON schemas of callable tools, passed to the template as ``tools``.
            chat_template: Jinja source (or the name of a template) to use instead of the model's.
            template_limits: Limits of this render; None: :attr:`template_limits`.
            **template_kwargs: Extra template variables, e.g. ``enable_thinking=False``; they
                override the special tokens (``bos_token``, ``eos_token``) of the same name.

        Returns:
            The prompt text (it includes BOS when the template writes it).

        Raises:
            TokenizerError: no template, or malformed messages.
            ChatTemplateError: the template failed or reached a limit.
        """
        if template_limits is not None and not isinstance(template_limits, TemplateLimits):
            raise TokenizerError(f"template_limits must be a TemplateLimits, got {type(template_limits).__name__}")
        source = self._select_template(chat_template, tools)
        compiled = self._compiled.get(source)
        if compiled is None:
            compiled = compile_chat_template(source, name=self.name)
            if source in self.chat_templates.values() or source == self.chat_template:
                self._compiled[source] = compiled
        variables = {**self.special_tokens_map, **template_kwargs}
        return render_chat_template(
            compiled,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            variables=variables,
            name=self.name,
            limits=template_limits or self.template_limits,
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        chat_template: str | None = None,
        template_limits: TemplateLimits | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Render a conversation with :meth:`apply_chat_template` and encode it.

        No BOS is prepended: the template writes it, as with ``transformers``.

        Returns:
            The prompt's token ids.

        Raises:
            TokenizerError: as :meth:`apply_chat_template`.
        """
        text = self.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            chat_template=chat_template,
            template_limits=template_limits,
            **template_kwargs,
        )
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self, *, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        """A new :class:`StreamingDetokenizer` for one generated sequence."""
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)


def _read_json_object(path: Path, error: type[LmxError]) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, key: str, source: Path) -> str | None:
    """A special token given as a string or as an ``{"content": ...}`` AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f"{key} in {source} must be a string or a {{'content': ...}} dict, got {value!r:.80}")


def _eos_ids(value: Any, source: str) -> list[int]:
    """``eos_token_id`` from a (generation) config: absent, an int, or a list of ints."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"eos_token_id in {source} must be an int or a list of ints, got {value!r:.80}")
    return values


def load_tokenizer(
    model_dir: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model directory.

    Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens,
    ``add_bos_token``, ``chat_template`` as a string or a list of named templates),
    ``chat_template.jinja`` (overrides the default template), ``additional_chat_templates/``
    and ``special_tokens_map.json`` (fallback for the special tokens). Truncation and padding
    saved in ``tokenizer.json`` are turned off.

    Args:
        model_dir: The model directory.
        config: The model's ``config.json``; read from ``model_dir`` when ``None``.
        generation_config: The model's ``generation_config.json``; read from ``model_dir`` when ``None``.

    Returns:
        The tokenizer. Its ``eos_token_ids`` is the union of the tokenizer's ``eos_token`` and
        the ``eos_token_id`` of ``config`` (or its ``text_config``) and ``generation_config``.

    Raises:
        TokenizerError: ``tokenizer.json`` is missing or malformed, or a tokenizer file holds a bad value.
        ConfigError: ``config.json`` or ``generation_config.json`` is malformed.
    """
    root = Path(model_dir)
    path = root / "tokenizer.json"
    if not path.is_file():
        where = "" if root.is_dir() else f" (directory {root} does not exist)"
        raise TokenizerError(f"{path} not found{where}: lmx needs a Hugging Face tokenizer.json")
    try:
        backend = tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    except Exception as e:  # the Rust parser raises plain Exception for any malformed file
        raise TokenizerError(f"{path} is not a valid tokenizers file: {e}") from e
    backend.no_truncation()
    backend.no_padding()

    config_path = root / "tokenizer_config.json"
    tk_config = _read_json_object(config_path, TokenizerError)
    special_map = _read_json_object(root / "special_tokens_map.json", TokenizerError)

    def special(key: str) -> str | None:
        if tk_config.get(key) is not None:
            return _token_content(tk_config[key], key, config_path)
        return _token_content(special_map.get(key), key, root / "special_tokens_map.json")

    add_bos = tk_config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerError(f"add_bos_token in {config_path} must be true or false, got {add_bos!r}")

    if config is None:
        config = _read_json_object(root / "config.json", ConfigError)
    if generation_config is None:
        generation_config = _read_json_object(root / "generation_config.json", ConfigError)
    eos: list[str | int] = []
    eos_token = special("eos_token")
    if eos_token is not None:
        eos.append(eos_token)
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        eos += _eos_ids(text_config.get("eos_token_id"), "config text_config")
    eos += _eos_ids(config.get("eos_token_id"), "config")
    eos += _eos_ids(generation_config.get("eos_token_id"), "generation_config")

    return Tokenizer(
        backend,
        bos_token=special("bos_token"),
        eos_tokens=eos,
        pad_token=special("pad_token"),
        add_bos_token=add_bos,
        chat_templates=load_chat_templates(root, tk_config),
        name=root.name or str(root),
    )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
