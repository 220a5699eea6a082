"""Sampling: parameter validation, temperature / top-k / top-p against hand-computed cases, the
draft's law (with Saguaro's weighting), the order and law of drawn children, and reproducible generators."""
import itertools
import math

import pytest
import torch
from scipy import stats

from specray.core.sampling import (
    SamplingParams,
    draft_law,
    draw,
    draw_children,
    draw_rows,
    make_generator,
    sample,
    target_probs,
    top_ids,
)

BASE = [0.1, 0.2, 0.3, 0.4]
LOGITS = torch.tensor(BASE).log()  # [4]: at T=1 the distribution is BASE


def probs_of(params: SamplingParams, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    """One row through target_probs: logits # [V] -> # [V]."""
    return target_probs(logits[None, None], [params])[0, 0]


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"seed": "7"}, "seed"),
])
def test_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_greedy_property():
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=1.0), BASE),
    (SamplingParams(temperature=0.5), [x * x / 0.30 for x in BASE]),
    (SamplingParams(temperature=1.0, top_k=2), [0, 0, 3 / 7, 4 / 7]),
    (SamplingParams(temperature=1.0, top_p=0.5), [0, 0, 3 / 7, 4 / 7]),  # 0.4 < 0.5: one more
    (SamplingParams(temperature=1.0, top_p=0.75), [0, 2 / 9, 3 / 9, 4 / 9]),
    (SamplingParams(temperature=1.0, top_p=0.05), [0, 0, 0, 1]),  # always at least one token
    # top-p acts on the top-k-renormalised law: [3/7, 4/7], and 4/7 >= 0.5 already
    (SamplingParams(temperature=1.0, top_k=2, top_p=0.5), [0, 0, 0, 1]),
    (SamplingParams(temperature=0.5, top_k=3), [0, 0.04 / 0.29, 0.09 / 0.29, 0.16 / 0.29]),
    (SamplingParams(temperature=0.0, top_k=3), [0, 0, 0, 1]),
])
def test_target_probs_hand_computed(params, expected):
    got = probs_of(params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_target_probs_mixed_batch_matches_rows_one_by_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 11, generator=g)  # [B, n, V]
    params = [SamplingParams(0.7, top_p=0.9), SamplingParams(), SamplingParams(0.7, top_p=0.9),
              SamplingParams(1.3, top_k=4)]
    got = target_probs(logits, params)  # [B, n, V]
    for b, sp in enumerate(params):
        torch.testing.assert_close(got[b], target_probs(logits[b:b + 1], [sp])[0])
    torch.testing.assert_close(got.sum(-1), torch.ones(4, 3))
    assert torch.equal(got[1].argmax(-1), logits[1].argmax(-1)) and set(got[1].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="one SamplingParams per sequence"):
        target_probs(logits, params[:3])


def test_greedy_ties_break_to_lower_id_in_both_laws():
    logits = torch.tensor([0.0, 2.0, 1.0, 2.0])
    assert probs_of(SamplingParams(), logits).tolist() == [0, 1, 0, 0]
    assert draft_law(logits[None], [SamplingParams()], [0], [1.0])[0].tolist() == [0, 1, 0, 0]
    assert top_ids(logits[None], 3)[0].tolist() == [1, 3, 2]


@pytest.mark.parametrize("seed", range(20))
def test_top_ids_equal_the_stable_full_sort_ties_included(seed):
    """top_ids' top-k shortcut ranks exactly as a stable descending sort of all V logits: integer-valued
    logits force ties inside the top n and across its boundary."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 6, (6, 40), generator=g).float()  # [M, V], many ties
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :8]
    assert torch.equal(top_ids(logits, 8), order)
    inner = torch.tensor([9., 9, 8, 8, 8, 7, 7, 6] + [0.] * 32)[torch.randperm(40, generator=g)][None]
    assert torch.equal(top_ids(inner, 8),  # ties only inside the top 8: no fallback
                       torch.sort(inner, dim=-1, descending=True, stable=True).indices[:, :8])
    assert top_ids(inner, 100).shape == (1, 40)  # never more than V


def test_draft_law_is_the_processed_full_law():
    """No truncation beyond the request's own: the draft's law is target_probs of its logits, top-k
    and top-p included, over the whole vocabulary."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 50, generator=g)  # [R, V]
    params = [SamplingParams(0.8, top_k=20, top_p=0.9)] * 4 + [SamplingParams(1.5)] * 3 + [SamplingParams()]
    got = draft_law(logits, params, [0] * 8, [1.0] * 8)
    torch.testing.assert_close(got, target_probs(logits[:, None], params)[:, 0])
    assert (got[4:7] > 0).all()  # the plain rows keep every token


def test_saguaro_scales_the_top_f_against_the_full_law():
    logits = torch.tensor([0.1, 0.05, 0.2, 0.25, 0.4]).log()  # [V]: at T=1 the law is these numbers
    base = torch.tensor([0.1, 0.05, 0.2, 0.25, 0.4])
    got = draft_law(logits[None], [SamplingParams(1.0)], [2], [0.5])[0]
    want = base * torch.tensor([1, 1, 1, 0.5, 0.5])  # ids 4 and 3 are the two highest logits
    torch.testing.assert_close(got, want / want.sum())
    # F = 4 of 5: still acts (the one unguessed-to-be token gains), and F >= V changes nothing
    got = draft_law(logits[None], [SamplingParams(1.0)], [4], [0.5])[0]
    assert got[1] > base[1] and got[4] < base[4]
    torch.testing.assert_close(draft_law(logits[None], [SamplingParams(1.0)], [5], [0.5])[0], base)
    # rows with fan 0, c = 1 or a greedy request are unchanged; mixed rows are weighted row by row
    rows = draft_law(logits.expand(3, 5), [SamplingParams(1.0), SamplingParams(1.0), SamplingParams()],
                     [0, 1, 2], [0.5, 0.2, 0.2])
    torch.testing.assert_close(rows[0], base)
    assert rows[1, 4] < base[4] and rows[1, 3] > base[3]
    assert rows[2].tolist() == [0, 0, 0, 0, 1]


def test_draw_children_order_and_exhaustion():
    ranked = torch.tensor([7, 3, 9, 5])  # by descending draft logit
    greedy = torch.zeros(10)
    greedy[7] = 1
    g = make_generator(0, "draft")
    assert draw_children(greedy, ranked, 3, False, g) == [7, 3, 9]  # deterministic candidates in rank order
    assert draw_children(greedy, ranked, 3, True, g) == [7, 7, 7]
    top_p = torch.zeros(10)
    top_p[7], top_p[3] = 0.6, 0.4
    seen = {tuple(draw_children(top_p, ranked, 4, False, g)) for _ in range(50)}
    assert seen == {(7, 3, 9, 5), (3, 7, 9, 5)}
    with pytest.raises(ValueError, match="children"):
        draw_children(top_p, ranked, 11, False, g)


def test_draw_children_without_replacement_follows_the_sequential_law():
    law = [0.5, 0.3, 0.2]
    ids, probs = torch.tensor([0, 1, 2]), torch.tensor(law)  # ids: the ranked ids (never reached here)
    g = make_generator(3, "draft")
    pairs = list(itertools.permutations(range(3), 2))
    counts = dict.fromkeys(pairs, 0)
    n = 6000
    for _ in range(n):
        counts[tuple(draw_children(probs, ids, 2, False, g))] += 1
    expected = [n * law[a] * law[b] / (1 - law[a]) for a, b in pairs]
    assert stats.chisquare([counts[pr] for pr in pairs], expected).pvalue > 1e-3


def test_generators_are_reproducible_and_streams_differ():
    draw = lambda g: torch.rand(4, generator=g).tolist()
    assert draw(make_generator(5, "draft")) == draw(make_generator(5, "draft"))
    assert draw(make_generator(5, "draft")) != draw(make_generator(5, "target"))
    assert draw(make_generator(5, "draft")) != draw(make_generator(6, "draft"))
    assert draw(make_generator(None, "draft")) != draw(make_generator(None, "draft"))


def test_sample_point_mass():
    assert sample(torch.tensor([0.0, 0, 1, 0]), make_generator(0, "t")) == 2


def test_draw_rows_is_draw_row_by_row():
    """The device-side single draw takes the same token as the host draw from the same generator state."""
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(64, 50, generator=g), -1)
    probs[5] = 0  # no mass: the fallback id
    seeds = list(range(64))
    got = draw_rows(probs, torch.full((64,), 7), [make_generator(s, "draft") for s in seeds]).tolist()
    want = [draw(row, 1, make_generator(s, "draft"))[0] if row.sum() > 0 else 7 for row, s in zip(probs, seeds)]
    assert got == want
