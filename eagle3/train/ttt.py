"""Training-time test (TTT): the EAGLE-3 multi-step unroll and its loss on one packed batch.

Indexing (one sample, positions 0..L-1; packed rows only restrict this to each sample's span):
- step 0, row t: hidden = fc(aux[t]) (target features of tokens <= t), input token t+1, RoPE
  position t; it predicts token t+2, i.e. the target's distribution at position t+1.
- step i, row t: hidden = the draft's own pre-norm output of step i-1 at row t, input token t+1+i,
  RoPE position t+i; it predicts token t+2+i (target distribution at position t+1+i).
- attention at step i, row t: step-0 keys of rows <= t of the same sample (causal), plus the key
  that each step j = 1..i produced at row t itself (one "diagonal" column per step): exactly the
  ancestors a tree node sees at inference.
- a row counts at step i when token t+2+i exists in the same sample, loss_mask[t+2+i] is set (the
  mask of the predicted token) and the target's argmax at position t+1+i is in the draft vocabulary.
  Rows that run off the end of their sample are dropped; their inputs are filler, and since a row
  only ever attends to earlier rows and to its own diagonal, filler never reaches a counted row.

The efficient form computes the causal step-0 scores once per step plus i extra score columns
(q . k_j per row), instead of re-running K full attentions over a K-times longer sequence.

train.loss_style = specforge reproduces SpecForge's online Eagle3 model (sgl-project/SpecForge,
specforge/algorithms/eagle3/model.py, core/loss.py, modeling/target/target_head.py at a6b6b02).
Inputs, targets and attention are the same as above; two things differ:
- mask offset: SpecForge shifts input ids and target logits left by one but not the loss mask,
  and shifts all three by one more per step, so row t of step i counts when loss_mask[t+i] is set
  (the token whose features the row carries, i steps on), where we use loss_mask[t+2+i] (the
  token the row predicts). Its data loader also zeroes the last mask position, so the target
  distribution at t+1+i must exist; the predicted token t+2+i need not. The in-vocabulary test
  (the target's argmax at t+1+i is a draft token) is the same in both.
  At step 0 SpecForge so trains on the predictions of an answer's third token through up to two
  tokens past its end-of-turn marker, we on its first token through the marker.
- normalisation: SpecForge's step loss is sum(mask * CE) / (B*T), a mean over every position of
  the batch (counted or not), where ours is a mean over the counted rows. With packed rows, B*T
  is the number of real (non-padding) tokens of the micro-batch: SpecForge pads each batch to
  its longest sample and usually trains one sample per GPU, so there B*T is that sample's length.
  Steps with fewer counted rows (later steps, answers short next to their prompts) weigh less.
The statistics (loss_i, acc_i, accept_i) stay means over the rows each style counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LOSS_STYLES = ("eagle3", "specforge")


@dataclass
class TargetDist:
    """What the loss needs from the target's logits, over the draft vocabulary only."""

    logp: torch.Tensor  # [B,T,Vd] log-softmax of the target logits restricted to the draft vocab
    p_full: torch.Tensor  # [B,T,Vd] full-vocabulary target probability of each draft token
    in_vocab: torch.Tensor  # [B,T] bool: the target's argmax is a draft token


def target_dist(
    logits_fn,
    hidden: torch.Tensor,
    draft_token_ids: torch.Tensor,
    t2d: torch.Tensor,
    need: torch.Tensor | None = None,
    chunk: int = 1024,
) -> TargetDist:
    """TargetDist from the target's final hidden states [B,T,Ht], in chunks of rows (never all of
    [B,T,V]), and only at the rows in `need` [B,T] (others read as out-of-vocab: never counted).

    logits_fn maps [N, Ht] hidden states to [N, V] target logits (the target's lm_head).
    """
    b, t, _ = hidden.shape
    vd = len(draft_token_ids)
    flat = hidden.reshape(b * t, -1)
    rows = need.reshape(-1).nonzero().squeeze(1) if need is not None else None
    n = len(rows) if rows is not None else b * t
    logp = hidden.new_zeros(b * t, vd, dtype=torch.float32)
    p_full = torch.zeros_like(logp)
    in_vocab = torch.zeros(b * t, dtype=torch.bool, device=hidden.device)
    with torch.no_grad():
        for s in range(0, n, chunk):
            idx = rows[s : s + chunk] if rows is not None else torch.arange(s, min(s + chunk, n))
            logits = logits_fn(flat[idx]).float()
            sub = logits[:, draft_token_ids]
            logp[idx] = torch.log_softmax(sub, dim=-1)
            p_full[idx] = torch.exp(sub - torch.logsumexp(logits, dim=-1, keepdim=True))
            in_vocab[idx] = t2d[logits.argmax(dim=-1)]
    return TargetDist(logp.view(b, t, vd), p_full.view(b, t, vd), in_vocab.view(b, t))


def needed_rows(
    segment: torch.Tensor, loss_mask: torch.Tensor, style: str = "eagle3"
) -> torch.Tensor:
    """bool [B,T]: positions p whose target distribution some step uses: p is not its sample's
    first position, and the token it predicts (p+1) is a loss token of the same sample
    (specforge: the token before it, p-1). Other positions skip the target's lm_head."""
    need = (shift(segment, -1, -1) == segment) & (segment >= 0)
    if style == "specforge":
        return need & shift(loss_mask, -1, False)
    return need & (shift(segment, 1, -1) == segment) & shift(loss_mask, 1, False)


def shift(x: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """x[:, t + k] at index t (dim 1), `fill` where t + k runs past either end."""
    if k == 0:
        return x
    if k < 0:
        pad = torch.full_like(x[:, :-k], fill)
        return torch.cat((pad, x[:, :k]), dim=1)
    pad = torch.full_like(x[:, :k], fill)
    return torch.cat((x[:, k:], pad), dim=1)


def block_causal(segment: torch.Tensor) -> torch.Tensor:
    """bool [B,T,T]: row t may see column s <= t of the same sample. Padding (segment < 0) sees
    only itself, so no softmax row is ever empty."""
    t = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=segment.device)
    return (same & causal & (segment[:, :, None] >= 0)) | eye


def valid_rows(
    segment: torch.Tensor,
    loss_mask: torch.Tensor,
    in_vocab: torch.Tensor,
    step: int,
    style: str = "eagle3",
) -> torch.Tensor:
    """bool [B,T]: rows counted at `step` (see the module docstring for both styles)."""
    if style == "specforge":
        same = (shift(segment, step + 1, -1) == segment) & (segment >= 0)
        return same & shift(loss_mask, step, False) & shift(in_vocab, step + 1, False)
    same = (shift(segment, step + 2, -1) == segment) & (segment >= 0)
    return same & shift(loss_mask, step + 2, False) & shift(in_vocab, step + 1, False)


def ttt_attend(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    diag_k: list[torch.Tensor],
    diag_v: list[torch.Tensor],
    allow: torch.Tensor,
) -> torch.Tensor:
    """Attention of q [B,n,T,d] over the step-0 keys k0/v0 [B,nkv,T,d] (where allow [B,T,T]) plus
    one diagonal column per earlier step (diag_k[j][:, :, t] for row t). Returns [B,n,T,d]."""
    b, n, t, d = q.shape
    nkv = k0.shape[1]
    qg = q.view(b, nkv, n // nkv, t, d)  # GQA without copying keys: group query heads per kv head
    scale = d**-0.5
    s0 = (qg @ k0[:, :, None].transpose(-1, -2)) * scale  # [B,nkv,g,T,T]
    s0 = s0.masked_fill(~allow[:, None, None], float("-inf"))
    cols = [s0] + [(qg * kj[:, :, None]).sum(-1, keepdim=True) * scale for kj in diag_k]
    p = torch.softmax(torch.cat(cols, dim=-1).float(), dim=-1).to(q.dtype)
    out = p[..., :t] @ v0[:, :, None]
    for j, vj in enumerate(diag_v):
        out = out + p[..., t + j : t + j + 1] * vj[:, :, None]
    return out.reshape(b, n, t, d)


def step_stats(
    draft_logits: torch.Tensor,
    target: TargetDist,
    rows: tuple[torch.Tensor, torch.Tensor],
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed soft cross-entropy over the counted rows (with grad) and detached stats [4]
    (count, loss sum, top-1 agreements, expected acceptance sum). draft_logits [N, Vd] are those
    of the counted rows (b, t); row t of `step` meets the target's distribution at t+1+step."""
    b, t = rows
    tlogp = target.logp[b, t + step + 1]
    logq = torch.log_softmax(draft_logits.float(), dim=-1)
    ce = -(tlogp.exp() * logq).sum(-1)
    loss_sum = ce.sum()
    with torch.no_grad():
        correct = (logq.argmax(-1) == tlogp.argmax(-1)).sum()
        # Probability that a token sampled from the draft is accepted by the (full) target.
        accept = torch.minimum(target.p_full[b, t + step + 1], logq.exp()).sum()
        count = torch.tensor(float(len(b)), device=loss_sum.device)
        stats = torch.stack((count, loss_sum.detach(), correct.float(), accept))
    return loss_sum, stats


class TTT(nn.Module):
    """The unroll as a module, so that DDP / FSDP wrap one forward. forward -> (loss, stats [K,4])."""

    def __init__(
        self,
        draft: nn.Module,
        steps: int,
        step_weight: float = 0.8,
        checkpointing: bool = False,
        loss_style: str = "eagle3",
    ):
        super().__init__()
        if steps < 1:
            raise ValueError(f"train.ttt_steps must be >= 1, got {steps}")
        if loss_style not in LOSS_STYLES:
            raise ValueError(f"train.loss_style must be one of {LOSS_STYLES}, got {loss_style!r}")
        self.draft = draft
        self.steps = steps
        self.step_weight = step_weight
        self.checkpointing = checkpointing
        self.loss_style = loss_style

    def forward(
        self,
        aux: torch.Tensor,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        segment: torch.Tensor,
        loss_mask: torch.Tensor,
        target: TargetDist,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """aux [B,T,3Ht], embeds [B,T,H] (target embedding of input_ids), position_ids / segment /
        loss_mask [B,T] (segment: sample index within the packed row, -1 for padding)."""
        draft = self.draft
        allow = block_causal(segment)
        hidden = draft.fuse(aux)
        k0 = v0 = None
        diag_k: list[torch.Tensor] = []
        diag_v: list[torch.Tensor] = []
        total = hidden.new_zeros((), dtype=torch.float32)
        stats = []
        # specforge: every step's loss sum is divided by the batch's real token count.
        tokens = (segment >= 0).sum().clamp(min=1).float()
        for i in range(self.steps):
            e = shift(embeds, i + 1)
            pos = position_ids + i
            if self.checkpointing:
                from torch.utils.checkpoint import checkpoint

                h, k, v = checkpoint(
                    self._layer,
                    e,
                    hidden,
                    pos,
                    k0,
                    v0,
                    tuple(diag_k),
                    tuple(diag_v),
                    allow,
                    use_reentrant=False,
                )
            else:
                h, k, v = self._layer(e, hidden, pos, k0, v0, diag_k, diag_v, allow)
            if i == 0:
                k0, v0 = k, v
            else:
                diag_k.append(k)
                diag_v.append(v)
            # The lm_head (the draft's largest matmul) runs only on the rows that count.
            rows = valid_rows(segment, loss_mask, target.in_vocab, i, self.loss_style)
            rows = rows.nonzero(as_tuple=True)
            loss_sum, st = step_stats(draft.logits(h[rows]), target, rows, i)
            denom = tokens if self.loss_style == "specforge" else st[0].clamp(min=1)
            total = total + self.step_weight**i * loss_sum / denom
            stats.append(st)
            hidden = h
        return total, torch.stack(stats)

    def _layer(self, e, hidden, pos, k0, v0, diag_k, diag_v, allow):
        """One draft step: (pre-norm output, this step's k, v). Step 0 when k0 is None; later
        steps append their k/v as the newest diagonal column."""
        draft = self.draft
        q, k, v = draft.qkv(e, hidden, pos)
        if k0 is None:
            out = ttt_attend(q, k, v, [], [], allow)
        else:
            out = ttt_attend(q, k0, v0, [*diag_k, k], [*diag_v, v], allow)
        return draft.finish(out, hidden), k, v


def summarize(stats: torch.Tensor, prefix: str, step_weight: float = 0.8) -> dict[str, float]:
    """Per-step means from summed stats [K,4]: loss_i, acc_i, accept_i, plus the weighted loss and
    tau, the expected accepted length of a chain draft (1 + sum_i prod_{j<=i} accept_j)."""
    out: dict[str, float] = {}
    total, run, tau = 0.0, 1.0, 1.0
    for i, (count, loss, correct, accept) in enumerate(stats.tolist()):
        c = max(count, 1.0)
        out[f"{prefix}/loss_{i}"] = loss / c
        out[f"{prefix}/acc_{i}"] = correct / c
        out[f"{prefix}/accept_{i}"] = accept / c
        out[f"{prefix}/positions_{i}"] = count
        total += step_weight**i * loss / c
        run *= accept / c
        tau += run
    out[f"{prefix}/loss"] = total
    out[f"{prefix}/tau"] = tau
    return out
