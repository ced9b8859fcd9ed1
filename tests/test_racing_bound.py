"""Racing's empirical Bernstein bound (evomerge/search/racing.py) worked by hand, and a race on 1,000 items
where most paired differences are 0: it stops a clearly worse candidate that Hoeffding's bound would not."""

from __future__ import annotations

import math

import pytest

from evomerge.search.racing import Race, half_width, round_count
from tests.test_racing import TableScorer


def test_the_half_width_by_hand():
    """delta = 3 e^-4 makes x = ln(3 / delta) = 4. At n = 200 with a mean square of 0.15:
    sqrt(x / 2n) = sqrt(0.01) = 0.1, the bound on the mean square is (0.1 + sqrt(0.01 + 0.15))^2 = 0.5^2 = 0.25,
    and the half width is sqrt(2 x 0.25 x 4 / 200) + 2 x 4 / 600 = 0.1 + 1/75."""
    assert half_width(200, 0.15, 3 * math.exp(-4)) == pytest.approx(0.1 + 1 / 75, abs=1e-12)
    # Differences that are all 0 still leave the bound on the mean square at 4 x / 2n = 0.04:
    # sqrt(2 x 0.04 x 4 / 200) + 1/75 = 0.04 + 1/75.
    assert half_width(200, 0.0, 3 * math.exp(-4)) == pytest.approx(0.04 + 1 / 75, abs=1e-12)
    # A mean square whose bound passes 1 (every item differs) is capped at 1: sqrt(8 / 200) + 1/75.
    assert half_width(200, 1.0, 3 * math.exp(-4)) == pytest.approx(0.2 + 1 / 75, abs=1e-12)


ITEMS = 1000
# A is right on every item but 50 in the second half (k >= 500, k % 10 == 5): 0.95 over every item, 1.0 over
# the first 496. B is A but wrong on the 15% of items with k % 20 < 3: 0.80. C is A but wrong on the 1% with
# k % 100 == 0: 0.94. Most differences are 0: A - B differs on 15% of the items, A - C on 1%.
A = [0.0 if k >= 500 and k % 10 == 5 else 1.0 for k in range(ITEMS)]
B = [0.0 if k % 20 < 3 else a for k, a in enumerate(A)]
C = [0.0 if k % 100 == 0 else a for k, a in enumerate(A)]


def test_on_1000_items_the_race_stops_a_clearly_worse_candidate_that_hoeffding_keeps():
    """3 candidates, rounds of 16, 32, ..., 512 (R = 6), delta = 0.05: delta' = 0.05 / (3 x 6), x = ln(1080).
    After the round ending at n = 240 items, A - B has mean 36/240 = 0.15 = its mean square; the bound on the
    mean square is (sqrt(x / 480) + sqrt(x / 480 + 0.15))^2 = 0.2770, so the half width is
    sqrt(2 x 0.2770 x / 240) + 2x / 720 = 0.1270 + 0.0194 = 0.1464 < 0.15: B is surely beaten and stops.
    Hoeffding's half width sqrt(2 ln(2 / delta') / n) is 0.2342 at n = 240 and still 0.1629 at n = 496,
    where A - B is 75/496 = 0.1512: it would have scored B on every item. C (1% from A) runs to the end."""
    pair_delta = 0.05 / (3 * 6)
    assert round_count(ITEMS, 16) == 6
    assert half_width(240, 0.15, pair_delta) == pytest.approx(0.1464, abs=1e-4)
    for n, gap in [(16, 3 / 16), (48, 9 / 48), (112, 18 / 112), (240, 36 / 240), (496, 75 / 496)]:
        assert gap < math.sqrt(2 * math.log(2 / pair_delta) / n)  # Hoeffding: never separated
    # In a generation of eight (28 pairs) the union is wider: B would stop after 496 items, not 240, and
    # Hoeffding would still keep it.
    eight = 0.05 / (28 * 6)
    assert half_width(240, 0.15, eight) > 0.15 and half_width(496, 75 / 496, eight) < 75 / 496
    assert math.sqrt(2 * math.log(2 / eight) / 496) > 75 / 496
    scorer = TableScorer([A, B, C])
    race = Race(score_items=scorer, metric="toy/acc", first_round=16, delta=0.05, selected=None, seed=0)
    outcomes = dict(race([0, 1, 2], proposals=[], generation=0))
    assert [len(outcomes[i].item_values) for i in range(3)] == [ITEMS, 240, ITEMS]
    assert sum(len(outcomes[i].item_values) for i in range(3)) == 2240  # against 3000 for every item
    # B is told A's 0.95 plus B - A on its 240 items (0.85 - 1.0): 0.80, its mean over every item here.
    # Its own mean over those items, 0.85, is what it used to be told.
    assert outcomes[1].metrics == {"toy/acc": pytest.approx(0.80), "toy/acc@prefix": pytest.approx(0.85)}
    assert outcomes[0].metrics == {"toy/acc": pytest.approx(0.95)}
    assert outcomes[2].metrics == {"toy/acc": pytest.approx(0.94)}
