"""Classify's scoring: the answers as a trie, and the scorer that runs a batch of texts against it.

See :mod:`lmx.classify` for how one call runs (the shared prefix, stage 1 over each text's own
tokens, stage 2 over the trie's nodes, one gather of the answers' log-probabilities). Work grows
with the distinct label tokens, in passes bounded by ``BRANCH_TOKENS``, ``STAGE2_SCORES`` and
``HEAD_ROWS``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import numpy as np

from lmx.models.ragged_cache import JoinedCache, Positions, RaggedCache, join_rows, split_rows

HEAD_ROWS = 256  # rows per LM-head call: bounds the (rows, vocab) logits
BRANCH_TOKENS = 512  # most trie nodes in a stage-2 pass (they attend to each other: its mask grows with the square)
STAGE2_SCORES = 2**24  # most (query, key) pairs of a stage-2 pass: bounds its attention scores and masks


# --------------------------------------------------------------------------- scoring
class Trie:
    """The answers as a trie of token prefixes, so that each distinct prefix is fed and scored once.

    A label's log-probability is the sum over its answer's tokens of log P(token | prompt and
    the tokens before it). Each distinct context (a node: a strict prefix of some answer, the
    empty one included) needs one hidden state and one LM-head row per text; each distinct
    (node, next token) pair (an edge) one gathered log-probability. Stage 2 feeds every node
    but the root as one token that sees the text and the node's ancestors.
    """

    def __init__(self, answers: list[list[int]]) -> None:
        nodes: dict[tuple[int, ...], int] = {(): 0}
        edges: dict[tuple[int, int], int] = {}
        paths = []
        for answer in answers:
            parents = [nodes.setdefault(tuple(answer[:k]), len(nodes)) for k in range(len(answer))]
            paths.append([edges.setdefault(edge, len(edges)) for edge in zip(parents, answer)])
        self.nodes = nodes
        self.edge_node = np.array([n for n, _ in edges], dtype=np.int64)  # (E,)
        self.edge_token = np.array([t for _, t in edges], dtype=np.int64)
        width = max(len(p) for p in paths)
        self.label_edges = np.array([p + [len(edges)] * (width - len(p)) for p in paths])  # pad: an edge worth 0

    def passes(self, budget: int) -> list[list[tuple[tuple[int, ...], bool]]]:
        """The non-root nodes in passes of at most ``budget`` nodes (more only where a node's
        ancestors alone exceed it), each pass closed under ancestors: ``(prefix, owned)``,
        where an ancestor repeated from an earlier pass is not owned (its hidden state is
        taken from that one). Depth-first order keeps the repeats few."""
        passes: list[list[tuple[tuple[int, ...], bool]]] = []
        members: set[tuple[int, ...]] = set()
        for prefix in sorted(p for p in self.nodes if p):
            missing = [prefix[:k] for k in range(1, len(prefix)) if prefix[:k] not in members]
            if not passes or (members and len(passes[-1]) + len(missing) + 1 > budget):
                passes.append([])
                members = set()
                missing = [prefix[:k] for k in range(1, len(prefix))]
            passes[-1] += [(p, False) for p in missing] + [(prefix, True)]
            members.update(missing, [prefix])
        return passes


class Scorer:
    """Runs the shared prefix once, then scores batches of texts against every answer."""

    def __init__(self, model: Any, answers: list[list[int]], pad_id: int, step: int, side: str) -> None:
        self.model, self.pad_id, self.step, self.side = model, pad_id, step, side
        self.trie = Trie(answers)
        self.windows = [getattr(c, "window", None) for c in model.make_cache()]
        self.prefix_len = 0
        self.prefix_kv: list[tuple[mx.array, mx.array]] = []

    def run_prefix(self, prefix: list[int]) -> None:
        """Compute the keys/values of the tokens every prompt starts with."""
        self.prefix_len = len(prefix)
        self.prefix_kv = []
        if prefix:
            positions = Positions(mx.zeros((1, 0), mx.int32), mx.zeros((1, 0), mx.bool_))
            caches = [RaggedCache(positions, w) for w in self.windows]
            self._feed(caches, positions, [prefix], mx.array([0], dtype=mx.int32), want_last=False)
            self.prefix_kv = [(c.keys, c.values) for c in caches]
            mx.eval(self.prefix_kv)

    def score(self, rows: list[tuple[int, list[int]]]) -> np.ndarray:
        """(B, n_labels) log-probabilities of every answer after each row's prompt."""
        n_rows, trie = len(rows), self.trie
        shared = mx.array([s for s, _ in rows], dtype=mx.int32)
        kpos = mx.broadcast_to(mx.arange(self.prefix_len, dtype=mx.int32)[None], (n_rows, self.prefix_len))
        positions = Positions(kpos, kpos < shared[:, None])
        caches = [RaggedCache(positions, w) for w in self.windows]
        for cache, (keys, values) in zip(caches, self.prefix_kv):
            cache.keys = mx.broadcast_to(keys, (n_rows, *keys.shape[1:]))  # (B, n_kv, P, D)
            cache.values = mx.broadcast_to(values, (n_rows, *values.shape[1:]))
        # Stage 1: each text's own tokens; the last one's hidden state is the trie's root.
        hidden = [self._feed(caches, positions, [seg for _, seg in rows], shared, want_last=True)]  # (B, H)
        where = np.zeros((n_rows, len(trie.nodes)), dtype=np.int64)  # row of `hidden` holding (text, node)
        where[:, 0] = np.arange(n_rows)
        if len(trie.nodes) > 1:
            mx.eval(hidden, [(c.keys, c.values) for c in caches])
            ends = shared + mx.array([len(seg) for _, seg in rows], dtype=mx.int32)
            count = n_rows
            for texts, h, nodes in self._feed_nodes(caches, positions, ends):
                where[np.ix_(texts, nodes)] = count + np.arange(h.shape[0]).reshape(len(texts), len(nodes))
                count += h.shape[0]
                hidden.append(h)
        return self._head_logprobs(mx.concatenate(hidden), where)

    def _feed_nodes(
        self, caches: list[RaggedCache], positions: Positions, ends: mx.array
    ) -> Iterator[tuple[np.ndarray, mx.array, np.ndarray]]:
        """Stage 2: run the trie's nodes after every text, a block of (texts, nodes) at a time;
        yield per block the texts, the hidden states of the nodes it owns ((texts x nodes, H),
        text-major) and those nodes."""
        n_texts, n_keys, trie = ends.shape[0], positions.kpos.shape[1], self.trie
        for members in trie.passes(BRANCH_TOKENS):
            n = len(members)
            index = {prefix: i for i, (prefix, _) in enumerate(members)}
            sees = np.zeros((n, n), dtype=bool)  # (query, key): a node sees itself and its ancestors
            for i, (prefix, _) in enumerate(members):
                sees[i, [index[prefix[:k]] for k in range(1, len(prefix) + 1)]] = True
            depth = np.array([len(prefix) - 1 for prefix, _ in members], dtype=np.int32)
            tokens = [prefix[-1] for prefix, _ in members]
            owned = np.array([i for i, (_, own) in enumerate(members) if own])
            nodes = np.array([trie.nodes[members[i][0]] for i in owned])
            step = max(1, min(n_texts, STAGE2_SCORES // (n * (n_keys + n))))
            for t0 in range(0, n_texts, step):
                t1 = min(n_texts, t0 + step)
                h = self._run_joined(caches, positions, ends[t0:t1], t0, tokens, depth, sees)  # (rows, 1, H)
                at = (np.arange(t1 - t0)[:, None] * n + owned[None]).ravel()
                picked = h[mx.array(at), 0]  # (texts x nodes, H)
                mx.eval(picked)
                yield np.arange(t0, t1), picked, nodes

    def _run_joined(
        self,
        caches: list[RaggedCache],
        positions: Positions,
        ends: mx.array,
        t0: int,
        tokens: list[int],
        depth: np.ndarray,
        sees: np.ndarray,
    ) -> mx.array:
        """Final hidden states (texts x nodes, 1, H) of trie nodes after each text ``t0..``: the
        layers run one by one (the split :mod:`lmx.generate.segments` uses), each node a row of
        one token up to attention (RoPE at its own position), each text's nodes one sequence
        through it, each seeing the text and its ancestors."""
        n_texts, n = ends.shape[0], len(tokens)
        kpos = positions.kpos[t0 : t0 + n_texts][:, None, :]  # (texts, 1, S)
        kvalid = positions.kvalid[t0 : t0 + n_texts][:, None, :]
        col = mx.array(depth)  # (T,) distance of each node from the text's end
        qpos = (ends[:, None] + col[None])[:, :, None]  # (texts, T, 1)
        own = mx.array(sees)  # (T, T)
        masks: dict[int | None, mx.array] = {}
        for window in set(self.windows):
            text_part, own_part = kvalid & (kpos <= qpos), own
            if window is not None:
                text_part = text_part & (qpos - kpos < window)
                own_part = own & (col[:, None] - col[None, :] < window)
            own_part = mx.broadcast_to(own_part[None], (n_texts, n, n))
            masks[window] = mx.concatenate([text_part, own_part], axis=2)[:, None]  # (texts, 1, T, S + T)
        offset = (ends[:, None] + col[None]).reshape(-1)  # (rows,) RoPE position of each node
        text_model = self.model.model
        h = text_model.embed(mx.array(tokens * n_texts)[:, None])  # (rows, 1, dim)
        for layer, cache in zip(self.model.layers, caches):
            q, k, v = layer.begin(h, offset)  # (rows, heads, 1, head_dim)
            q, k, v = (join_rows(x, n_texts) for x in (q, k, v))  # (texts, heads, T, head_dim)
            joined = JoinedCache(cache.keys[t0 : t0 + n_texts], cache.values[t0 : t0 + n_texts], masks[cache.window])
            out = layer.self_attn.attend(q, k, v, joined, None)
            h = layer.end(h, split_rows(out, n, 1))
        return text_model.norm(h)

    def _head_logprobs(self, hidden: mx.array, where: np.ndarray) -> np.ndarray:
        """Sum log P(token) over each (text, answer)'s edges. The LM head runs on every
        (text, node) once, in blocks of rows (on a CPU each call reads all its weights); from
        each block's logits only the needed log-probabilities are taken, with one gather."""
        trie = self.trie
        row = where[:, trie.edge_node]  # (B, E): the hidden row of each (text, edge)
        order = np.argsort(row, axis=None, kind="stable")
        flat_rows, flat_tokens = row.ravel()[order], np.tile(trie.edge_token, row.shape[0])[order]
        bounds = np.searchsorted(flat_rows, np.arange(0, hidden.shape[0] + HEAD_ROWS, HEAD_ROWS))
        logsumexp = self.model.ops.logsumexp  # on lmx's CPU kernels one vectorised op, ~15x MLX's on the CPU
        parts = []
        for i, c in enumerate(range(0, hidden.shape[0], HEAD_ROWS)):
            lo, hi = bounds[i], bounds[i + 1]
            logits = self.model.head(hidden[None, c : c + HEAD_ROWS])[0].astype(mx.float32)  # (rows, V)
            local, tokens = mx.array(flat_rows[lo:hi] - c), mx.array(flat_tokens[lo:hi])
            parts.append(logits[local, tokens] - logsumexp(logits)[local, 0])
            mx.eval(parts[-1])
        values = np.empty(row.size)
        values[order] = np.array(mx.concatenate(parts).tolist(), dtype=np.float64)
        edge_logprobs = np.concatenate([values.reshape(row.shape), np.zeros((row.shape[0], 1))], axis=1)
        return edge_logprobs[:, trie.label_edges].sum(axis=-1)  # (B, n_labels)

    def _pad(self, seqs: list[list[int]], start: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Pad ``seqs`` to one length: (tokens, valid, RoPE offset of column 0 per row)."""
        width = max(1, max(len(s) for s in seqs))
        pads = [width - len(s) for s in seqs]
        if self.side == "left":
            tokens = [[self.pad_id] * p + s for p, s in zip(pads, seqs)]
            valid = [[False] * p + [True] * len(s) for p, s in zip(pads, seqs)]
            start = start - mx.array(pads, dtype=mx.int32)
        else:
            tokens = [s + [self.pad_id] * p for p, s in zip(pads, seqs)]
            valid = [[True] * len(s) + [False] * p for p, s in zip(pads, seqs)]
        return mx.array(tokens), mx.array(valid), start.astype(mx.int32)

    def _feed(
        self,
        caches: list[RaggedCache],
        positions: Positions,
        seqs: list[list[int]],
        start: mx.array,
        *,
        want_last: bool,
    ) -> mx.array | None:
        """Run padded ``seqs`` through the model in chunks; return each row's last real hidden state."""
        tokens, qvalid, start = self._pad(seqs, start)
        width = tokens.shape[1]
        last = mx.array([width - 1 if self.side == "left" else len(s) - 1 for s in seqs])
        out = None
        for c in range(0, width, self.step):
            chunk = tokens[:, c : c + self.step]
            positions.add(start + c, qvalid[:, c : c + self.step])
            h = self.model.hidden(chunk, caches)  # (B, L, H)
            if want_last:
                n = chunk.shape[1]
                here = (last >= c) & (last < c + n)
                picked = mx.take_along_axis(h, mx.clip(last - c, 0, n - 1)[:, None, None], axis=1)[:, 0]
                out = picked if out is None else mx.where(here[:, None], picked, out)
            if c + self.step < width:
                mx.eval([(cc.keys, cc.values) for cc in caches], out if out is not None else [])
        return out


__all__ = ["BRANCH_TOKENS", "HEAD_ROWS", "STAGE2_SCORES", "Scorer", "Trie"]
