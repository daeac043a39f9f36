"""Helpers for the engine tests and benchmarks: a tiny draft head distilled in seconds.

`train_tiny_head` fits an EAGLE-3 head to the tiny target's OWN greedy text with a short TTT-style
loop (step 0 on target features, then `steps - 1` unrolled steps feeding back the draft's own
hidden state, each row seeing the causal step-0 keys plus its own earlier-step keys), so the
engine sees real acceptance at several depths. It is a test fixture, not the trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eagle3.data.vocab import build_draft_vocab, count_tokens
from eagle3.models.draft import DraftConfig, Eagle3Draft

TRAIN_SEED = 0


def random_prompts(n_seq: int = 12, prompt_len: int = 8, seed: int = TRAIN_SEED) -> torch.Tensor:
    """Random token prompts; seed TRAIN_SEED gives the prompts the tiny head is trained on."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 5000, (n_seq, prompt_len), generator=g)


@torch.no_grad()
def hf_greedy(model, ids: list[int], max_new: int, eos: list[int]) -> list[int]:
    """The reference every exactness test compares with: HF generate on one unpadded prompt,
    greedy, cut after the first EOS."""
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos[0] if eos else 0,
    )
    new = out[0, len(ids) :].tolist()
    stop = next((k for k, t in enumerate(new) if t in eos), None)
    return new if stop is None else new[: stop + 1]


@torch.no_grad()
def greedy_text(
    target, n_seq: int = 12, prompt_len: int = 8, new: int = 56, seed: int = TRAIN_SEED
) -> torch.Tensor:
    prompts = random_prompts(n_seq, prompt_len, seed)
    out = target.model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
    )
    return out


def train_tiny_head(
    target,
    steps: int = 3,
    iters: int = 150,
    draft_vocab: int = 512,
    seed: int = 0,
    lr: float = 3e-3,
) -> Eagle3Draft:
    ids = greedy_text(target, seed=seed)
    feats = target.features(ids)
    aux, tgt = feats.aux, feats.logits.argmax(-1)  # tgt[t] = target's token at t + 1
    vocab = build_draft_vocab(count_tokens(target.vocab_size, ids), draft_vocab)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draft = Eagle3Draft(DraftConfig.from_target(target.config, draft_vocab))
    draft.set_vocab(vocab.d2t, vocab.t2d)
    t2d_index = torch.cumsum(vocab.t2d.long(), 0) - 1  # target id -> draft id (where in vocab)
    embeds = target.embed(ids).detach()
    b, t, _ = aux.shape
    opt = torch.optim.AdamW(draft.parameters(), lr=lr)
    pos = torch.arange(t)[None].expand(b, -1)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for _ in range(iters):
        hidden = draft.fuse(aux)
        keys, values, loss = [], [], 0.0
        for i in range(steps):
            # Row t at step i: input token t + 1 + i, position t + i; predicts tgt[t + 1 + i].
            n = t - 1 - i - 1
            if n < 4:
                break
            emb = embeds[:, 1 + i : 1 + i + n]
            h_in = hidden[:, :n]
            q, k, v = draft.qkv(emb, h_in, pos[:, :n] + i)
            keys.append(k)
            values.append(v)
            if i == 0:
                out = _attend_ttt(q, keys, values, causal[:n, :n])
            else:
                out = _attend_ttt(
                    q,
                    [kk[:, :, :n] for kk in keys],
                    [vv[:, :, :n] for vv in values],
                    causal[:n, :n],
                )
            h = draft.finish(out, h_in)
            label = tgt[:, 1 + i : 1 + i + n]
            ok = vocab.t2d[label]
            logits = draft.logits(h)
            loss = loss + (0.8**i) * F.cross_entropy(logits[ok], t2d_index[label[ok]])
            hidden = h
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()


def _attend_ttt(q, keys, values, causal):
    """Step-0 keys causally, each later step's keys only on the diagonal (the row's own ancestry)."""
    groups = q.shape[1] // keys[0].shape[1]
    ks = [k.repeat_interleave(groups, dim=1) for k in keys]
    vs = [v.repeat_interleave(groups, dim=1) for v in values]
    scale = q.shape[-1] ** -0.5
    s0 = (q @ ks[0].transpose(-1, -2)) * scale
    s0 = s0.masked_fill(~causal, float("-inf"))
    diag = [((q * k).sum(-1, keepdim=True)) * scale for k in ks[1:]]
    w = torch.cat([s0, *diag], dim=-1).softmax(-1)
    n = s0.shape[-1]
    out = w[..., :n] @ vs[0]
    for j, v in enumerate(vs[1:]):
        out = out + w[..., n + j : n + j + 1] * v
    return out
