"""embedft.distributed: shares, the gather with its per-rank backward, and their no-op form in one process."""

from pathlib import Path

import numpy as np
import pytest

from embedft import distributed as D
from embedft_testing.ranks import run_ranks


def test_one_process_is_the_default_and_every_helper_is_a_no_op():
    import torch

    assert D.from_env({}) == D.Dist(0, 1, 0) and not D.current().enabled
    x = torch.randn(3, 2)
    assert D.gather_rows(x, [3]) is x and D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_array(np.arange(3)).tolist() == [0, 1, 2]


def test_a_bad_torchrun_environment_is_a_clear_error():
    with pytest.raises(RuntimeError, match="RANK=2 is not within WORLD_SIZE=2"):
        D.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="not integers"):
        D.from_env({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_balanced_shares_cover_every_item_once_with_about_equal_tokens(world):
    lengths = np.random.default_rng(0).integers(1, 60, size=23)
    shares = [D.balanced_shard(lengths, D.Dist(r, world)) for r in range(world)]
    mine = np.concatenate([s.mine for s in shares])
    assert sorted(mine.tolist()) == list(range(23))
    assert all(s.counts == shares[0].counts for s in shares) and sum(shares[0].counts) == 23
    tokens = [int(lengths[s.mine].sum()) for s in shares]
    assert max(tokens) - min(tokens) <= lengths.max()  # dealt by length: within one sequence of each other
    gathered = np.concatenate([np.asarray(s.mine) for s in shares])  # what gather_rows returns: rank order
    assert shares[0].restore(gathered).tolist() == list(range(23))  # back in input order


def _gather_and_backward(n: int) -> dict:
    """A loss over every rank's rows; each rank's share embedded alone, gathered, its gradients summed."""
    import torch

    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(n, 4)
    share = D.balanced_shard(list(range(n)))
    local = x[torch.as_tensor(share.mine)] @ w
    rows = share.restore(D.gather_rows(local, share.counts))
    loss = (rows.softmax(0) * torch.arange(3.0)).sum() + rows[0].sum()
    loss.backward()
    D.all_reduce_grads([w])
    uneven = D.all_gather_array(np.full((D.current().rank + 1, 2), D.current().rank))
    return {"loss": float(loss.detach()), "grad": w.grad.numpy().copy(), "rows": rows.detach().numpy(),
            "uneven": uneven}


@pytest.mark.parametrize("n", [7, 1])  # 1: a rank with no rows still takes part
def test_two_ranks_give_the_one_process_loss_rows_and_gradient(n):
    one = _gather_and_backward(n)
    for r in run_ranks(_gather_and_backward, 2, n):
        assert r["loss"] == pytest.approx(one["loss"], abs=1e-6)
        np.testing.assert_allclose(r["rows"], one["rows"], atol=1e-6)
        np.testing.assert_allclose(r["grad"], one["grad"], atol=1e-6)
        assert r["uneven"].ravel().tolist() == [0, 0, 1, 1, 1, 1]  # rank 0's one row, then rank 1's two


def test_a_command_that_ends_well_leaves_the_process_group_after_a_barrier_and_a_failed_one_without(monkeypatch,
                                                                                                    tmp_path):
    """A rank that closed its gloo connections at once could abort a peer still finishing its last send."""
    import torch.distributed as td
    from click.testing import CliRunner

    from embedft.cli import main

    calls = []
    monkeypatch.setattr(td, "is_initialized", lambda: True)
    monkeypatch.setattr(td, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(td, "destroy_process_group", lambda: calls.append("destroy"))
    D.teardown(sync=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    D.teardown()
    assert calls == ["destroy"]

    calls.clear()
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the experiment's data path is relative to the repo
    assert CliRunner().invoke(main, ["check", "experiments/default.yaml"]).exit_code == 0
    assert calls == ["barrier", "destroy"]
    calls.clear()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    assert CliRunner().invoke(main, ["check", str(bad)]).exit_code == 2
    assert "barrier" not in calls  # the other ranks may wait in another collective: no barrier to pair with it
