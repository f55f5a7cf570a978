"""Tokenization for lmx: encode/decode, chat templates and streaming detokenization.

Pure Python over the Hugging Face ``tokenizers`` library and ``jinja2``; nothing here
imports ``mlx``.
"""

from __future__ import annotations

from lmx.tokenizer.detokenizer import StreamingDetokenizer
from lmx.tokenizer.sandbox import TemplateLimits
from lmx.tokenizer.tokenizer import Tokenizer, common_prefix, load_tokenizer

__all__ = ["StreamingDetokenizer", "TemplateLimits", "Tokenizer", "common_prefix", "load_tokenizer"]
