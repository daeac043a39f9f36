"""A tokenized training sample: what online TTT training and feature extraction consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenSample:
    sample_id: str
    input_ids: torch.Tensor  # int64 [T]: the rendered conversation (chat template applied)
    loss_mask: torch.Tensor  # bool  [T]: True on assistant tokens (incl. end-of-turn)

    def __len__(self) -> int:
        return len(self.input_ids)
