"""Helpers for the trainer tests (and the torchrun worker): target-distribution samples, a vocab."""

from __future__ import annotations

import torch

from eagle3.data.features import FeatureSample
from eagle3.data.samples import TokenSample
from eagle3.data.vocab import DraftVocab, build_draft_vocab, count_tokens


@torch.no_grad()
def greedy_samples(
    target, n: int = 24, prompt_len: int = 6, new: int = 26, seed: int = 0
) -> list[TokenSample]:
    """Random-token prompts continued greedily by the target itself (so the text follows the
    target's own distribution); lengths vary, and the loss mask covers the continuation."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 5000, (n, prompt_len), generator=g)
    for _ in range(new):  # batched greedy decoding without a cache: tiny and exact
        last = target.model.model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
        ids = torch.cat((ids, target.lm_head(last).argmax(-1, keepdim=True)), 1)
    cut = torch.randint(prompt_len + 8, ids.shape[1] + 1, (n,), generator=g).tolist()
    out = []
    for i in range(n):
        mask = torch.zeros(cut[i], dtype=torch.bool)
        mask[prompt_len:] = True
        out.append(TokenSample(f"g{i}", ids[i, : cut[i]].clone(), mask))
    return out


def vocab_for(target, samples, size: int) -> DraftVocab:
    ids = torch.cat([s.input_ids for s in samples])
    mask = torch.cat([s.loss_mask for s in samples])
    return build_draft_vocab(count_tokens(target.vocab_size, ids, mask), size)


@torch.no_grad()
def feature_samples(target, samples, dtype=torch.float32) -> list[FeatureSample]:
    """What an offline shard holds for each sample (one target forward per sample, unpacked)."""
    out = []
    for s in samples:
        f = target.features(s.input_ids[None], with_logits=False)
        out.append(
            FeatureSample(
                s.sample_id,
                s.input_ids,
                s.loss_mask,
                f.aux[0].to(dtype),
                f.last_hidden[0].to(dtype),
            )
        )
    return out


def tiny_train_recipe(tiny_recipe, run_dir, *overrides: str):
    from eagle3.config import build_recipe

    tree = tiny_recipe.model_dump(mode="json", exclude_none=True)
    tree["run_dir"] = str(run_dir)
    base = [
        "train.max_len=64",
        "train.batch_tokens=128",
        "train.log_every=1",
        "train.eval_every=2",
        "train.save_every=3",
        "train.ttt_steps=3",
        "train.lr=3e-3",
    ]
    return build_recipe(tree, base + list(overrides))


def draft_state(run_dir) -> dict[str, torch.Tensor]:
    from eagle3.train.state import load_state

    return load_state(run_dir / "train_state")["model"]
