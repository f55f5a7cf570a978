"""The process group of a tensor- or pipeline-parallel run: MLX's own ``mlx.distributed`` (ring, MPI, NCCL), nothing home-made.

A run across N processes is started by ``mlx.launch`` (``lmx generate --tensor-parallel N`` does it
for one host); each process calls :func:`join_group` once and gets a :class:`Group`: its rank, the
size and the backend. Rank 0 is the one that talks to people (prints, serves HTTP); every rank
runs the same model code on its own slices of the weights.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from lmx.errors import GroupLostError, InvalidOptionError

BACKENDS = ("any", "ring", "mpi", "nccl")


@dataclass(frozen=True)
class Group:
    """The processes of one tensor-parallel run.

    Attributes:
        rank: this process's index, 0 to ``size - 1``.
        size: how many processes share the model.
        backend: the ``mlx.distributed`` backend asked for (``ring``, ``mpi``, ``nccl`` or ``any``).
        handle: MLX's group object, passed to the collectives.
        split: ``tensor-parallel`` or ``pipeline-parallel`` (for messages).
    """

    rank: int
    size: int
    backend: str
    handle: Any = None
    split: str = "tensor-parallel"  # or "pipeline-parallel": how the model is split over the ranks

    def all_sum(self, x: mx.array) -> mx.array:
        """The elementwise sum of ``x`` over the ranks (every rank gets the same bits)."""
        return mx.distributed.all_sum(x, group=self.handle)

    def all_gather(self, x: mx.array) -> mx.array:
        """The ranks' ``x`` concatenated along the first axis, rank 0 first."""
        return mx.distributed.all_gather(x, group=self.handle)

    def send(self, x: mx.array, dst: int) -> mx.array:
        """``x``, sending it to rank ``dst`` when evaluated (pipeline parallel: the next rank's input)."""
        return mx.distributed.send(x, dst, group=self.handle)

    def recv(self, shape: tuple[int, ...], dtype: mx.Dtype, src: int) -> mx.array:
        """The array of ``shape`` and ``dtype`` that rank ``src`` sends (evaluated: waits for it)."""
        return mx.distributed.recv(shape, dtype, src, group=self.handle)

    @property
    def leader(self) -> bool:
        """Whether this is rank 0 (the one that talks to people)."""
        return self.rank == 0

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (the others' is ignored)."""
        mine = mx.array([value if self.rank == 0 else 0], dtype=mx.int64)
        return int(self.all_sum(mine).item())

    def share_bytes(self, data: bytes) -> bytes:
        """Rank 0's ``data`` on every rank (the others' is ignored).

        Raises:
            GroupLostError: a rank is gone (its connection closed).
        """
        try:
            n = self.broadcast_int(len(data))
            if n == 0:
                return b""
            mine = np.frombuffer(data, dtype=np.uint8) if self.rank == 0 else np.zeros(n, dtype=np.uint8)
            return np.array(self.all_sum(mx.array(mine))).astype(np.uint8).tobytes()
        except RuntimeError as e:
            raise self.lost(e) from e

    def lost(self, error: BaseException) -> GroupLostError:
        """The error saying this group lost a rank (``error``: what the backend raised)."""
        return GroupLostError(
            f"rank {self.rank} of {self.size}: another rank of the {self.split} group ended or is unreachable "
            f"({error}); this rank holds only its part of the model and stops: restart every rank"
        )

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.backend})"


def join_group(backend: str = "any") -> Group:
    """Join the process group ``mlx.launch`` started this process in (a group of one when it did not).

    Args:
        backend: one of ``any``, ``ring``, ``mpi``, ``nccl``.

    Raises:
        InvalidOptionError: an unknown backend, or one MLX cannot start here.
    """
    if backend not in BACKENDS:
        raise InvalidOptionError(f"distributed backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        handle = mx.distributed.init(strict=False, backend=backend)
    except (RuntimeError, ValueError) as e:
        raise InvalidOptionError(f"cannot start the {backend!r} distributed backend: {e}") from e
    return Group(rank=handle.rank(), size=handle.size(), backend=backend, handle=handle)


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A port p such that p .. p + count - 1 are free on ``host`` (the ring backend listens on one per rank).

    Raises:
        InvalidOptionError: none found in 50 tries.
    """
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port + count > 65536:
            continue
        held: list[socket.socket] = []
        try:
            for i in range(count):
                sock = socket.socket()
                held.append(sock)
                sock.bind((host, port + i))
            return port
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise InvalidOptionError(f"found no {count} consecutive free ports on {host} for the ring backend")


def launcher() -> list[str]:
    """The ``mlx.launch`` command of this Python environment."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def launch_command(n: int, command: list[str], host: str = "127.0.0.1") -> list[str]:
    """``mlx.launch`` running ``command`` in ``n`` ring processes on ``host``, on free ports."""
    return [
        *launcher(),
        "--backend",
        "ring",
        "--hosts",
        host,
        "-n",
        str(n),
        "--starting-port",
        str(free_ports(n, host)),
        "--",
        *command,
    ]


__all__ = ["BACKENDS", "Group", "free_ports", "join_group", "launch_command", "launcher"]
