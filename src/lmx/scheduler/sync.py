"""Keeping the schedulers of a tensor-parallel group in step (:class:`lmx.scheduler.Scheduler` with ``sync``).

Every rank runs the same deterministic scheduler over its slices of the model; only rank 0 (the
leader) takes requests. Once per turn of its loop, the leader shares what happened since the last
turn: the requests submitted (prompt ids, options, token limit), the ones cancelled, whether it is
closing. The followers replay it, so every rank takes the same batches, prefill chunks and
decisions, and the collectives inside the model line up. Decisions that read local state (the
free memory that admission compares against) use the leader's value.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol

from lmx.generate.options import GenerationOptions


class TurnSync(Protocol):
    """What a scheduler needs of its group: rank 0's bytes and numbers on every rank."""

    @property
    def leader(self) -> bool:
        """Whether this rank takes requests (rank 0)."""
        ...

    def share_bytes(self, data: bytes) -> bytes:
        """The leader's ``data`` on every rank (the others' is ignored). Blocks until all ranks call it."""
        ...

    def broadcast_int(self, value: int) -> int:
        """The leader's ``value`` on every rank."""
        ...

    def lost(self, error: BaseException) -> Exception:
        """The error (an :class:`lmx.errors.GroupLostError`) for a collective that failed with ``error``."""
        ...


class NullSink:
    """Where a follower's tokens go: nowhere (the leader's sink has them)."""

    def token(self, token: Any) -> None:
        pass

    def end(self, error: BaseException | None) -> None:
        pass


def options_to_dict(options: GenerationOptions) -> dict[str, Any]:
    """``options`` as JSON values (``logit_bias`` keys become strings; the options take them back)."""
    out = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    if out["logit_bias"] is not None:
        out["logit_bias"] = {str(k): v for k, v in out["logit_bias"].items()}
    out["stop"] = list(out["stop"])
    out.pop("constraint")
    return out


def encode_turn(new: list[dict[str, Any]], cancelled: list[int], close: bool) -> bytes:
    """The leader's message for one turn (empty when nothing happened)."""
    if not new and not cancelled and not close:
        return b""
    return json.dumps({"new": new, "cancelled": cancelled, "close": close}).encode()


def decode_turn(data: bytes) -> dict[str, Any]:
    """A turn's message as :func:`encode_turn` made it."""
    if not data:
        return {"new": [], "cancelled": [], "close": False}
    return json.loads(data.decode())


__all__ = ["NullSink", "TurnSync", "decode_turn", "encode_turn", "options_to_dict"]
