"""benchmarks/margin_intruders.py: on planted vectors, which texts are intruders (another group's text in an
anchor's top 10 above its weakest positive), which of them each margin drops, and where each anchor's first
candidate past the margin lies; and the whole script on the sample data with a tiny random BERT."""

import re
import sys

import numpy as np
import pytest

from embedft.data.batches import build_pair_source
from embedft.data.examples import Examples


@pytest.fixture(scope="module")
def intruders(benchmark_script):
    return benchmark_script("margin_intruders")


def _planted():
    """Group A: a0, a1 (0.99 to a0), a2 (0.6 to a0: A's weakest pair); group B: b0 and b1, one vector at 0.9 to a0."""
    ex = Examples("grouped", "planted", np.arange(5) + 1, ["a0", "a1", "a2", "b0", "b1"], groups=list("AAABB"),
                  labels=None)
    src = build_pair_source(ex)
    e = np.eye(8, dtype=np.float32)
    b = 0.9 * e[0] + np.sqrt(1 - 0.81) * e[3]
    docs = np.stack([e[0], 0.99 * e[0] + np.sqrt(1 - 0.99 ** 2) * e[1], 0.6 * e[0] + 0.8 * e[2], b, b])
    return docs, src


def test_intruders_and_what_each_margin_drops(intruders):
    docs, src = _planted()
    got = intruders.intruder_counts(docs, src, (0.05, 0.2))
    # a0: b0, b1 (0.9) above a2 (0.6); a1: b0, b1 (0.891) above a2 (0.594); a2: b (0.54) below a1 (0.594); b0, b1: none
    assert got["anchors"] == 5 and got["with_intruder"] == 2 and got["intruders"] == 4
    # the miner's rule, p = the best positive (0.99 for a0 and a1): 0.05 keeps up to 0.9405, 0.2 up to 0.792
    assert got["dropped"] == {0.05: 0, 0.2: 4}
    # a0's ranking: itself, a1, b0, b1, a2; the first candidate past the margin is b0 (rank 2), none at 0.2
    assert got["first_eligible"][0.05][0] == 2 and got["first_eligible"][0.2][0] == 42
    # the samples' record: a0 (row 0) with its nearest intruder (b0 or b1, tied at 0.9) and its weakest positive a2
    a, j, s, weak, weak_s, best_s = got["first_intruder"][0]
    assert (a, weak) == (0, 2) and j in (3, 4) and sorted(got["first_intruder"]) == [0, 1]
    assert (s, weak_s, best_s) == pytest.approx((0.9, 0.6, 0.99), abs=1e-5)


def test_the_script_reports_each_margin(intruders, tiny_bert_experiment, tiny_bert_adapter, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["margin_intruders.py", str(tiny_bert_experiment), "--adapter",
                                      str(tiny_bert_adapter), "--margins", "0.05,0.3", "--samples", "2"])
    intruders.main()
    out = capsys.readouterr().out
    n = int(re.search(r"(\d+) intruders in all", out).group(1))
    dropped = [int(x) for x in re.findall(r"drops (\d+) of the intruders", out)]
    assert len(dropped) == 2 and dropped[0] <= dropped[1] <= n  # a wider margin drops at least as many
