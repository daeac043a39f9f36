"""The draft vocabulary: the Vd most frequent target tokens among trainable tokens.

d2t holds offsets (target_id = draft_id + d2t[draft_id]); t2d marks the target ids that are in the
draft vocabulary. Draft ids follow ascending target ids, as in the EAGLE-3 reference. On disk:
`<data dir>/vocab.safetensors` (d2t, t2d; coverage, seen and padded as metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class DraftVocab:
    d2t: torch.Tensor  # int64 [Vd]
    t2d: torch.Tensor  # bool  [V]
    coverage: float  # share of counted trainable tokens that the draft vocabulary covers
    seen: int  # distinct tokens seen
    padded: int  # tokens added (never seen) to fill Vd

    @property
    def target_ids(self) -> torch.Tensor:
        return torch.arange(len(self.d2t)) + self.d2t


def count_tokens(
    vocab_size: int, token_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Token frequencies [V] over the positions where mask is set."""
    ids = token_ids.reshape(-1).long()
    if mask is not None:
        ids = ids[mask.reshape(-1).bool()]
    return torch.bincount(ids, minlength=vocab_size)[:vocab_size]


def build_draft_vocab(counts: torch.Tensor, draft_vocab_size: int) -> DraftVocab:
    """Top-Vd tokens by count (ties: lower id first), sorted ascending.

    Padding rule: when fewer than Vd distinct tokens were seen, the remaining slots take the
    lowest unseen target ids, so the vocabulary always has exactly Vd entries.
    """
    counts = counts.long()
    vocab_size = len(counts)
    vd = min(draft_vocab_size, vocab_size)
    # Stable sort on -count keeps lower ids first among equal counts.
    order = torch.sort(-counts, stable=True).indices
    seen = int((counts > 0).sum())
    chosen = order[:vd]
    padded = max(0, vd - seen)
    ids = torch.sort(chosen).values
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    d2t = ids - torch.arange(vd)
    total = int(counts.sum())
    coverage = float(counts[ids].sum()) / total if total else 0.0
    return DraftVocab(d2t=d2t, t2d=t2d, coverage=coverage, seen=seen, padded=padded)


VOCAB_FILE = "vocab.safetensors"


def save_vocab(path: str | Path, vocab: DraftVocab) -> None:
    """Write the vocabulary atomically (temp file + rename)."""
    from eagle3.data.features import save_tensors

    meta = {"coverage": repr(vocab.coverage), "seen": str(vocab.seen), "padded": str(vocab.padded)}
    save_tensors({"d2t": vocab.d2t, "t2d": vocab.t2d}, Path(path), meta)


def load_vocab(data_dir: str | Path) -> DraftVocab:
    """The vocabulary of a finished data stage."""
    from safetensors import safe_open

    path = Path(data_dir) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `eagle3 data` first")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return DraftVocab(
            d2t=f.get_tensor("d2t"),
            t2d=f.get_tensor("t2d").bool(),
            coverage=float(meta["coverage"]),
            seen=int(meta["seen"]),
            padded=int(meta["padded"]),
        )
