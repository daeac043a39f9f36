"""The Runner protocol on the HF backend: prefill, tree verification and in-place compaction.

References are plain full forwards of the same token sequences (no cache, no tree).
"""

from __future__ import annotations

import pytest
import torch

from eagle3.infer.runner import HFRunner, Runner, make_runner

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

TOL = 1e-4


def _plain(target, ids: list[int]):
    f = target.features(torch.tensor([ids]))
    return f.logits[0], f.aux[0]


def _random_tree(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random parents (row 0 = root) and the ancestor mask."""
    parents = torch.full((n,), -1)
    mask = torch.eye(n, dtype=torch.bool)
    for j in range(1, n):
        parents[j] = int(torch.randint(0, j, (1,), generator=gen))
        mask[j] |= mask[parents[j]]
    return parents, mask


def test_hf_runner_is_a_runner(tiny_target):
    assert isinstance(make_runner(tiny_target, "hf"), Runner)
    with pytest.raises(ValueError, match="infer.backend"):
        make_runner(tiny_target, "nope")


def test_prefill_matches_plain_forward_and_continues(tiny_target):
    ids = torch.randint(0, 4000, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_logits, ref_aux = _plain(tiny_target, ids)
    run = HFRunner(tiny_target, capacity=4)  # forces the buffer to grow twice
    logits, aux = run.prefill(torch.tensor(ids[:13]))
    assert logits.shape == (13, tiny_target.vocab_size) and aux.shape == (
        13,
        3 * tiny_target.hidden_size,
    )
    torch.testing.assert_close(logits, ref_logits[:13], atol=TOL, rtol=0)
    torch.testing.assert_close(aux, ref_aux[:13], atol=TOL, rtol=0)
    # A second prefill appends causally on top of the cache.
    logits, aux = run.prefill(torch.tensor(ids[13:]), last_only=True)
    assert run.cache_len == 21 and logits.shape == (1, tiny_target.vocab_size)
    torch.testing.assert_close(logits[0], ref_logits[-1], atol=TOL, rtol=0)
    torch.testing.assert_close(aux, ref_aux[13:], atol=TOL, rtol=0)


def test_tree_verify_equals_each_path_forward(tiny_target):
    """Every tree row's logits/aux equal those of a plain forward of prefix + its root path."""
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 4000, (9,), generator=gen).tolist()
    n = 11
    parents, mask = _random_tree(n, gen)
    tokens = torch.randint(0, 4000, (n,), generator=gen)
    depth = mask.sum(1) - 1
    run = HFRunner(tiny_target)
    run.prefill(torch.tensor(prefix))
    logits, aux = run.verify(tokens, len(prefix) + depth, mask)
    assert run.cache_len == len(prefix)  # verify commits nothing
    for j in range(n):
        path = mask[j].nonzero().flatten()
        ref_logits, ref_aux = _plain(tiny_target, prefix + tokens[path].tolist())
        torch.testing.assert_close(logits[j], ref_logits[-1], atol=TOL, rtol=0)
        torch.testing.assert_close(aux[j], ref_aux[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_compaction_equals_plain_prefill_after_many_cycles(tiny_target, backend):
    """After N verify+keep cycles on random trees, the KV cache equals a fresh prefill's.

    Every backend honours the same protocol, so the fast runner is held to it here too."""
    gen = torch.Generator().manual_seed(3)
    seq = torch.randint(0, 4000, (7,), generator=gen).tolist()
    run = make_runner(tiny_target, backend, capacity=16)
    run.prefill(torch.tensor(seq))
    for cycle in range(6):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        parents, mask = _random_tree(n, gen)
        tokens = torch.randint(0, 4000, (n,), generator=gen)
        run.verify(tokens, len(seq) + mask.sum(1) - 1, mask)
        # Keep the root path of a random row (cycle 0: the root alone).
        leaf = int(torch.randint(0, n, (1,), generator=gen)) if cycle else 0
        rows = mask[leaf].nonzero().flatten()
        run.keep(rows)
        seq += tokens[rows].tolist()
        assert run.cache_len == len(seq)
    fresh = HFRunner(tiny_target)  # the reference is always the HF forward
    fresh.prefill(torch.tensor(seq))
    for layer in range(tiny_target.num_layers):
        for got, want in zip(run.layer_kv(layer), fresh.layer_kv(layer), strict=True):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # And the next token's logits agree with a plain forward.
    nxt = [5]
    logits, _ = run.verify(
        torch.tensor(nxt), torch.tensor([len(seq)]), torch.ones(1, 1, dtype=torch.bool)
    )
    torch.testing.assert_close(logits[0], _plain(tiny_target, seq + nxt)[0][-1], atol=TOL, rtol=0)


def test_bad_calls_name_the_problem(tiny_target):
    run = HFRunner(tiny_target)
    with pytest.raises(ValueError, match="empty"):
        run.prefill(torch.tensor([], dtype=torch.long))
    run.prefill(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="tree_mask"):
        run.verify(torch.tensor([4, 5]), torch.tensor([3, 4]), torch.ones(3, 3, dtype=torch.bool))
    run.verify(
        torch.tensor([4, 5]), torch.tensor([3, 4]), torch.ones(2, 2, dtype=torch.bool).tril()
    )
    with pytest.raises(ValueError, match="not verified"):
        run.keep(torch.tensor([0, 2]))
