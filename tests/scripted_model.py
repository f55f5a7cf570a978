"""A tiny Qwen 3 checkpoint that writes scripted replies, for tests of what the server makes of a
model's text (tool calls...). Saved by transformers, loaded by lmx like any other model.

Each script is a list of pieces; each piece is one added token. The residual stream carries the
token embedding unchanged (every attention and MLP output projection is zero), and the
embedding is a one-hot of the token's *class*: its piece, or "other" for every other token. The
output head maps a piece to the next piece of its script (the last to EOS), and "other" to the
first piece of the default script. So a prompt ends on an "other" token and greedy decoding
writes the default script, or another one whose first token a ``logit_bias`` (+50, above the
default's +40, below a script's own +80) picks; the script then runs to its end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken

from tiny_models import qwen_config, train_tokenizer

EOS = "<|im_end|>"
HIDDEN = 64
NEXT_LOGIT = 10.0  # times sqrt(HIDDEN) from the norm: 80
DEFAULT_LOGIT = 5.0  # 40


def save_scripted(
    out: Path, scripts: dict[str, list[str]], default: str, chat_template: str, bos: str | None = None
) -> dict[str, int]:
    """Write the checkpoint to ``out``.

    Args:
        scripts: name -> pieces; a piece may appear in one script only.
        default: the script written when no logit_bias picks another.
        chat_template: Jinja source of its chat template.
        bos: the BOS token the template writes, if any.

    Returns:
        The token id of each script's first piece (what a ``logit_bias`` names to pick it).
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pieces = [p for script in scripts.values() for p in script]
    assert len(set(pieces)) == len(pieces), "a piece may appear in one script only"
    assert len(pieces) < HIDDEN
    tok = train_tokenizer()
    tok.add_tokens([AddedToken(p, special=False, normalized=False, single_word=False) for p in pieces])
    vocab = tok.get_vocab_size()
    ids = {p: tok.token_to_id(p) for p in pieces}
    eos = tok.token_to_id(EOS)
    config = qwen_config(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=1, eos_token_id=eos, max_position_embeddings=4096
    )
    model = Qwen3ForCausalLM(Qwen3Config(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, 0] = 1.0  # class 0: "other"
        for cls, piece in enumerate(pieces, start=1):
            embed[ids[piece], 0] = 0.0
            embed[ids[piece], cls] = 1.0
        for script in scripts.values():
            for i, piece in enumerate(script):
                nxt = ids[script[i + 1]] if i + 1 < len(script) else eos
                head[nxt, pieces.index(piece) + 1] = NEXT_LOGIT
        head[ids[scripts[default][0]], 0] = DEFAULT_LOGIT
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    tok_config = {"bos_token": bos, "eos_token": EOS, "pad_token": "<pad>", "add_bos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": chat_template}))
    return {name: ids[script[0]] for name, script in scripts.items()}
