"""Sampling filters, samplers, logits processors and keys, on hand-written distributions.

Every expected set and value below is written out by hand, not computed by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lmx  # noqa: F401  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from lmx.errors import InvalidOptionError
from lmx.generate.options import GenerationOptions
from lmx.generate.row import RowSampler, sample_rows
from lmx.generate.sampling import (
    KeySequence,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    categorical,
    make_logits_processors,
    make_sampler,
    top_logprobs,
)
from lmx.runtime.ops import MLX_OPS, CpuKernelOps, Ops

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]
ALL = {0, 1, 2, 3, 4}


def log_of(*rows: list[float]) -> mx.array:
    """(B, V) log-probabilities of the given rows of probabilities (0 -> -inf)."""
    with np.errstate(divide="ignore"):
        return mx.array(np.log(np.array(rows, dtype=np.float32)))


def kept(filtered: mx.array, original: mx.array) -> list[set[int]]:
    """The ids each row kept; kept entries must be unchanged, the rest exactly -inf."""
    out, ref = np.array(filtered), np.array(original)
    assert out.shape == ref.shape
    finite = np.isfinite(out)
    np.testing.assert_array_equal(out[finite], ref[finite])
    assert np.all(out[~finite] == -np.inf)
    return [set(np.flatnonzero(row).tolist()) for row in finite]


# ------------------------------------------------------------------------- top_k


@pytest.mark.parametrize(
    "k, expected",
    [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (4, {0, 1, 2, 3}), (0, ALL), (5, ALL), (9, ALL)],
)
def test_top_k_keeps_k_most_likely(k: int, expected: set[int]) -> None:
    lp = log_of(PROBS)
    assert kept(apply_top_k(lp, k), lp) == [expected]


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    lp = log_of([0.2, 0.4, 0.2, 0.2])
    assert kept(apply_top_k(lp, 2), lp) == [{0, 1, 2, 3}]
    assert kept(apply_top_k(lp, 1), lp) == [{1}]


def test_top_k_rows_independent() -> None:
    lp = log_of(PROBS, [0.05, 0.1, 0.5, 0.15, 0.2])
    assert kept(apply_top_k(lp, 2), lp) == [{0, 1}, {2, 4}]


# ------------------------------------------------------------------------- top_p


@pytest.fixture(params=["mlx", "cpu-kernels"])
def ops(request: pytest.FixtureRequest) -> Ops:
    """Both sampling ops: MLX's (a full sort for top_p, a Gumbel draw) and the CPU kernels' (a sort of
    one bucket, the inverted distribution)."""
    if request.param == "mlx":
        return MLX_OPS
    from lmx.kernels import load_module

    module, reason = load_module()
    assert module is not None, reason
    return CpuKernelOps(module)


@pytest.mark.parametrize(
    "p, expected",
    [
        (1e-6, {0}),
        (0.3, {0}),
        (0.5, {0}),  # the top token alone reaches 0.5 exactly
        (0.5001, {0, 1}),
        (0.7, {0, 1}),  # 0.5 + 0.2 reaches 0.7 exactly: no third token
        (0.71, {0, 1, 2}),
        (0.85, {0, 1, 2}),
        (0.86, {0, 1, 2, 3}),
        (0.95, {0, 1, 2, 3}),
        (0.951, ALL),
        (1.0, ALL),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(p: float, expected: set[int], ops: Ops) -> None:
    lp = log_of(PROBS)
    assert kept(apply_top_p(lp, p, ops), lp) == [expected]


@pytest.mark.parametrize(
    "probs, p, expected",
    [
        # Float32 sums of these land a hair below p; the set still reaches p.
        ([0.4, 0.25, 0.15, 0.1, 0.1], 0.4, {0}),
        ([0.4, 0.25, 0.15, 0.1, 0.1], 0.8, {0, 1, 2}),
        ([0.65, 0.15, 0.1, 0.05, 0.05], 0.8, {0, 1}),
        ([0.5, 0.4, 0.1], 0.5, {0}),
    ],
)
def test_top_p_exact_boundary_despite_float32_rounding(
    probs: list[float], p: float, expected: set[int], ops: Ops
) -> None:
    lp = log_of(probs)
    assert kept(apply_top_p(lp, p, ops), lp) == [expected]


def test_top_p_order_of_vocab_does_not_matter(ops: Ops) -> None:
    lp = log_of([0.1, 0.05, 0.5, 0.15, 0.2])
    assert kept(apply_top_p(lp, 0.71, ops), lp) == [{2, 3, 4}]


def test_top_p_renormalises_what_earlier_filters_left(ops: Ops) -> None:
    # After top_k=2 only 0.5 and 0.2 remain: renormalised 5/7 ~ 0.714 and 2/7.
    lp = log_of([0.5, 0.2, 0.0, 0.0, 0.0])
    assert kept(apply_top_p(lp, 0.7, ops), lp) == [{0}]
    assert kept(apply_top_p(lp, 0.72, ops), lp) == [{0, 1}]


def test_top_p_unnormalised_input_same_as_normalised(ops: Ops) -> None:
    lp = log_of(PROBS) + 3.0
    assert kept(apply_top_p(lp, 0.71, ops), lp) == [{0, 1, 2}]


def test_top_p_keeps_ties_with_last_kept_token(ops: Ops) -> None:
    lp = log_of([0.3, 0.4, 0.3])
    assert kept(apply_top_p(lp, 0.5, ops), lp) == [{0, 1, 2}]
    assert kept(apply_top_p(lp, 0.4, ops), lp) == [{1}]


def test_top_p_rows_independent(ops: Ops) -> None:
    lp = log_of(PROBS, [0.05, 0.1, 0.15, 0.2, 0.5])
    assert kept(apply_top_p(lp, 0.6, ops), lp) == [{0, 1}, {3, 4}]


# ------------------------------------------------------------------------- min_p


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.0, ALL),
        (0.05, ALL),
        (0.1, ALL),  # threshold 0.05: the last token sits on it and stays
        (0.11, {0, 1, 2, 3}),
        (0.2, {0, 1, 2, 3}),  # threshold 0.1, exactly the fourth token
        (0.25, {0, 1, 2}),
        (0.35, {0, 1}),
        (0.41, {0}),
        (0.99, {0}),
    ],
)
def test_min_p_keeps_tokens_at_least_min_p_times_the_top(min_p: float, expected: set[int]) -> None:
    lp = log_of(PROBS)
    assert kept(apply_min_p(lp, min_p), lp) == [expected]


def test_min_p_exact_boundary_despite_float32_rounding() -> None:
    lp = log_of([0.5, 0.45, 0.05])  # 0.45 is exactly 0.9 * 0.5
    assert kept(apply_min_p(lp, 0.9), lp) == [{0, 1}]


def test_min_p_unnormalised_input_and_rows_independent() -> None:
    lp = log_of(PROBS, [0.3, 0.3, 0.2, 0.1, 0.1]) - 2.0
    assert kept(apply_min_p(lp, 0.35), lp) == [{0, 1}, {0, 1, 2}]


# ----------------------------------------------------------------------- samplers


def test_greedy_is_argmax_per_row_and_ignores_key() -> None:
    lp = log_of([0.1, 0.6, 0.3], [0.7, 0.1, 0.2])
    sampler = make_sampler(0.0, top_k=2, top_p=0.5, min_p=0.1)
    for seed in range(3):
        assert sampler(lp, mx.random.key(seed)).tolist() == [1, 0]


def test_categorical_never_draws_excluded_tokens(ops: Ops) -> None:
    logits = mx.broadcast_to(mx.array([[0.0, -mx.inf, 0.0, -mx.inf]]), (4000, 4))
    drawn = np.array(categorical(logits, 0.7, mx.random.key(0), ops))
    assert set(drawn.tolist()) == {0, 2}
    wide = np.full((64, 5000), -np.inf, dtype=np.float32)  # past one block of the kernel's partial sums
    wide[:, [3, 2999, 4998]] = [0.0, 1.0, -1.0]
    drawn = np.array(categorical(mx.array(wide), 1.0, mx.random.key(1), ops))
    assert set(drawn.tolist()) == {3, 2999, 4998}


# 99.99% quantiles of chi-square with df = 1..4 degrees of freedom.
CHI2_9999 = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51}


def _p(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values]


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p, expected",
    [
        (1.0, 0, 1.0, 0.0, PROBS),
        (1.0, 2, 1.0, 0.0, [5 / 7, 2 / 7, 0, 0, 0]),
        (1.0, 0, 0.8, 0.0, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        (1.0, 0, 1.0, 0.25, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        (1.0, 3, 1.0, 0.35, [5 / 7, 2 / 7, 0, 0, 0]),
        # Temperature 0.5 squares the probabilities; 2.0 takes their square roots.
        (0.5, 0, 1.0, 0.0, _p([0.25, 0.04, 0.0225, 0.01, 0.0025])),
        (2.0, 4, 0.9, 0.0, _p([math.sqrt(0.5), math.sqrt(0.2), math.sqrt(0.15), math.sqrt(0.1), 0])),
    ],
)
def test_sampled_frequencies_match_filtered_distribution(
    temperature: float, top_k: int, top_p: float, min_p: float, expected: list[float], ops: Ops
) -> None:
    n = 20_000
    sampler = make_sampler(temperature, top_k, top_p, min_p, ops)
    lp = mx.broadcast_to(log_of(PROBS), (n, len(PROBS)))  # n independent rows, one draw each
    counts = np.bincount(np.array(sampler(lp, mx.random.key(1234))), minlength=len(PROBS))
    want = np.array(expected) * n
    excluded = want == 0
    assert np.all(counts[excluded] == 0)
    chi2 = float(np.sum((counts[~excluded] - want[~excluded]) ** 2 / want[~excluded]))
    assert chi2 < CHI2_9999[int((~excluded).sum()) - 1], (counts, want)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_k": -1}, "top_k"),
        ({"temperature": 1.0, "min_p": 1.0}, "min_p"),
    ],
)
def test_make_sampler_rejects_bad_parameters(kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidOptionError, match=name):
        make_sampler(**kwargs)


# --------------------------------------------------------------------------- keys


def _keys(seq: KeySequence, n: int) -> list[list[int]]:
    return [seq.next().tolist() for _ in range(n)]


def test_same_seed_same_keys_and_tokens_different_seed_differs() -> None:
    assert _keys(KeySequence(7), 5) == _keys(KeySequence(7), 5)
    assert _keys(KeySequence(7), 5) != _keys(KeySequence(8), 5)
    keys = _keys(KeySequence(7), 5)
    assert len({tuple(k) for k in keys}) == 5  # every step gets a fresh key

    sampler = make_sampler(1.0)
    lp = log_of(PROBS, PROBS[::-1])

    def draw(seed: int) -> list[list[int]]:
        seq = KeySequence(seed)
        return [sampler(lp, seq.next()).tolist() for _ in range(30)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_seedless_sequence_draws_fresh_seed_and_can_be_replayed() -> None:
    a, b = KeySequence(None), KeySequence()
    assert a.seed != b.seed
    assert isinstance(a.seed, int) and a.seed >= 0
    assert _keys(a, 3) == _keys(KeySequence(a.seed), 3)


def test_key_sequence_leaves_global_random_state_alone() -> None:
    mx.random.seed(123)
    expected = mx.random.uniform(shape=(4,)).tolist()
    mx.random.seed(123)
    seq = KeySequence(None)
    make_sampler(1.0)(log_of(PROBS), seq.next()).item()
    seq.next()
    assert mx.random.uniform(shape=(4,)).tolist() == expected


def test_key_sequence_rejects_bad_seed() -> None:
    with pytest.raises(InvalidOptionError, match="seed"):
        KeySequence(-1)


# --------------------------------------------------------------- logits processors

LOGITS = [2.0, -1.0, 0.5, -3.0, 0.0, 1.0]
TOKENS = [0, 1, 2, 2, 3]  # prompt [0, 1], then generated [2, 2, 3]


def process(options: GenerationOptions, tokens: list[list[int]], logits: list[list[float]], prompt_len: int):
    processors = make_logits_processors(options, prompt_len)
    out = mx.array(logits, dtype=mx.float32)
    toks = mx.array(tokens, dtype=mx.int32)
    for proc in processors:
        out = proc(toks, out)
    return out.tolist(), processors


def test_no_processors_when_all_off() -> None:
    assert make_logits_processors(GenerationOptions(), prompt_len=3) == []
    assert make_logits_processors(GenerationOptions(logit_bias={}), prompt_len=3) == []
    both = GenerationOptions(repetition_penalty=1.1, frequency_penalty=0.5, logit_bias={1: 1.0})
    assert len(make_logits_processors(both, prompt_len=3)) == 3


@pytest.mark.parametrize(
    "context, expected",
    [
        (3, [2.0, -1.0, 0.25, -6.0, 0.0, 1.0]),  # last 3 tokens: 2, 2, 3 (2 counted once)
        (64, [1.0, -2.0, 0.25, -6.0, 0.0, 1.0]),  # the prompt too
        (1, [2.0, -1.0, 0.5, -6.0, 0.0, 1.0]),
    ],
)
def test_repetition_penalty(context: int, expected: list[float]) -> None:
    opts = GenerationOptions(repetition_penalty=2.0, repetition_context_size=context)
    out, _ = process(opts, [TOKENS], [LOGITS], prompt_len=2)
    assert out == [expected]


def test_repetition_penalty_leaves_zero_logit_at_zero_and_below_one_boosts() -> None:
    opts = GenerationOptions(repetition_penalty=0.5)
    out, _ = process(opts, [[4, 0, 3]], [LOGITS], prompt_len=3)
    assert out == [[4.0, -1.0, 0.5, -1.5, 0.0, 1.0]]


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    opts = GenerationOptions(presence_penalty=0.5, frequency_penalty=0.25)
    out, _ = process(opts, [TOKENS], [LOGITS], prompt_len=2)
    # token 2: 0.5 - 0.5 - 2 * 0.25; token 3: -3 - 0.5 - 0.25; prompt tokens 0 and 1 untouched.
    assert out == [[2.0, -1.0, -0.5, -3.75, 0.0, 1.0]]
    out, _ = process(opts, [TOKENS], [LOGITS], prompt_len=5)  # nothing generated yet
    assert out == [LOGITS]


@pytest.mark.parametrize("generated", [7, 1500])  # gathered per token; one dense count past 1,024
def test_presence_and_frequency_penalties_of_long_histories(generated: int) -> None:
    rng = np.random.default_rng(generated)
    tokens = rng.integers(0, 40, size=(2, 3 + generated))  # 40 of 64 ids, many repeats
    logits = rng.standard_normal((2, 64)).astype(np.float32)
    opts = GenerationOptions(presence_penalty=0.5, frequency_penalty=0.25)
    (proc,) = make_logits_processors(opts, prompt_len=3)
    got = np.array(proc(mx.array(tokens), mx.array(logits)))
    want = logits.astype(np.float64).copy()
    for row in range(2):
        ids, counts = np.unique(tokens[row, 3:], return_counts=True)
        want[row, ids] -= 0.25 * counts + 0.5
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_negative_presence_and_frequency_penalties_boost() -> None:
    opts = GenerationOptions(presence_penalty=-1.0, frequency_penalty=-0.5)
    out, _ = process(opts, [TOKENS], [LOGITS], prompt_len=2)
    assert out == [[2.0, -1.0, 2.5, -1.5, 0.0, 1.0]]


def test_logit_bias_adds_to_named_tokens() -> None:
    opts = GenerationOptions.from_kwargs(logit_bias={"5": -100, 1: 2.5})
    out, _ = process(opts, [TOKENS], [LOGITS], prompt_len=2)
    assert out == [[2.0, 1.5, 0.5, -3.0, 0.0, -99.0]]


def test_processors_compose_in_order_penalties_then_bias() -> None:
    opts = GenerationOptions(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={2: 1.0})
    out, _ = process(opts, [TOKENS], [LOGITS], prompt_len=2)
    # repetition: [1, -2, 0.25, -6, 0, 1]; then token 2 -= 0.5 + 0.5, token 3 -= 0.75; then token 2 += 1.
    assert out == [[1.0, -2.0, 0.25, -6.75, 0.0, 1.0]]


def test_processors_handle_batch_rows_independently() -> None:
    opts = GenerationOptions(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    tokens = [TOKENS, [5, 5, 4, 4, 4]]
    logits = [LOGITS, [1.0, 1.0, 1.0, 1.0, -2.0, 3.0]]
    out, _ = process(opts, tokens, logits, prompt_len=2)
    assert out == [
        [1.0, -2.0, 0.25 - 1.0, -6.0 - 0.75, 0.0, 1.0],
        # token 5 is only in the prompt: 3 / 2; token 4: -2 * 2, then - 0.5 - 3 * 0.25.
        [1.0, 1.0, 1.0, 1.0, -5.25, 1.5],
    ]


def test_processors_do_not_modify_their_input() -> None:
    opts = GenerationOptions(repetition_penalty=2.0, presence_penalty=0.5, logit_bias={0: 3.0})
    logits = mx.array([LOGITS])
    tokens = mx.array([TOKENS])
    for proc in make_logits_processors(opts, prompt_len=2):
        proc(tokens, logits)
    assert logits.tolist() == [LOGITS]


# ------------------------------------------------------------------- top_logprobs


def test_top_logprobs_sorted_descending_per_row() -> None:
    lp = log_of([0.1, 0.5, 0.05, 0.3, 0.05], [0.6, 0.05, 0.1, 0.05, 0.2])
    ids, values = top_logprobs(lp, 3)
    assert ids.tolist() == [[1, 3, 0], [0, 4, 2]]
    np.testing.assert_allclose(np.array(values), np.log([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]]), rtol=1e-6)


def test_top_logprobs_zero_and_more_than_vocab() -> None:
    lp = log_of([0.1, 0.6, 0.3], [0.2, 0.3, 0.5])
    ids, values = top_logprobs(lp, 0)
    assert ids.shape == (2, 0) and values.shape == (2, 0)
    ids, _ = top_logprobs(lp, 10)
    assert ids.tolist() == [[1, 2, 0], [2, 1, 0]]


# ------------------------------------------------------------ rows of a batch (sample_rows)

MIXED_ROWS = [
    {"temperature": 0.8, "top_p": 0.9, "seed": 1},
    {"temperature": 0},
    {"temperature": 0.8, "top_p": 0.9, "seed": 2},
    {"temperature": 0, "frequency_penalty": 0.3, "presence_penalty": 0.2},
    {"temperature": 1.0, "top_k": 50, "min_p": 0.01, "seed": 3},
    {"temperature": 0.8, "top_p": 0.9, "seed": 4},
    {"temperature": 0.7, "repetition_penalty": 1.3, "seed": 5},
    {"temperature": 0, "frequency_penalty": 0.3, "presence_penalty": 0.2},
]


def test_rows_sampled_together_draw_what_each_draws_alone(ops: Ops) -> None:
    """Seeded rows with the same settings are filtered and drawn in one set of ops (each with its
    own keys); processed rows are written back into the batch. Over 12 steps every row must choose
    what it chooses in a batch of one, with the same log-probabilities."""
    width, steps = 3000, 12
    prompt = [5, 9, 9, 40]

    def make() -> list[RowSampler]:
        return [RowSampler(GenerationOptions(**o), prompt, None, ops) for o in MIXED_ROWS]

    batched, alone = make(), make()
    for step in range(steps):
        logits = mx.random.normal((len(MIXED_ROWS), width), key=mx.random.key(step)) * 3
        tokens, logprobs = sample_rows(logits, batched, ops)
        for i, row in enumerate(alone):
            one, one_lp = sample_rows(logits[i : i + 1], [row], ops)
            assert tokens[i].item() == one.item(), (step, i, MIXED_ROWS[i])
            np.testing.assert_allclose(np.array(logprobs[i]), np.array(one_lp[0]), atol=1e-6, rtol=0)


def test_seeded_rows_with_the_same_settings_differ_and_repeat(ops: Ops) -> None:
    """Three rows with the same settings and different seeds draw different tokens from one flat
    distribution; the same seeds again draw the same tokens."""
    opts = [GenerationOptions(temperature=1.0, top_p=0.95, seed=s) for s in (11, 12, 13)]
    logits = mx.zeros((3, 5000))

    def draw() -> list[list[int]]:
        rows = [RowSampler(o, [1], None, ops) for o in opts]
        return [sample_rows(logits, rows, ops)[0].tolist() for _ in range(4)]

    first = draw()
    assert first == draw()
    assert len({tuple(t[i] for t in first) for i in range(3)}) == 3  # each row its own draws
