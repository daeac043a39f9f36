"""The EAGLE-2 dynamic draft tree, drafted by an EAGLE-3 head that keeps its own KV cache.

Row convention (the same as training-time test and the EAGLE reference): a draft row pairs the
hidden state that stands for target position t with the embedding of the token at t + 1, and sits
at rotary position t. After the target accepted tokens up to position P - 1 and sampled the root
token at position P, the draft cache holds rows 0 .. P - 1 (row P - 1 = aux(P - 1) + embed(root)).

Tree growth for `depth` levels with `top_k` branching (depth = draft tokens on the longest path):
level 1 is the top_k of the last prefix row's distribution; each further level runs the draft on
the top_k frontier rows (hidden = the parent row's pre-norm output, embed = the frontier token,
position P + level - 1, attending to the prefix, the row's ancestors and itself), scores every
child by cumulative log-probability, and keeps the global top_k as the next frontier. All
candidates are kept; the best `total_tokens` of them form the tree (an ancestor never scores below
its descendant and wins ties by its lower index, so the choice is closed under ancestors).

Rows of the returned tree: 0 is the root, then the chosen nodes in creation order, so a parent
always comes before its children, and siblings come in descending draft probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eagle3.models.kv import KVBuffer


@dataclass
class Tree:
    tokens: torch.Tensor  # int64 [n]  target ids; row 0 is the root
    parents: torch.Tensor  # int64 [n]  parent row; -1 for the root
    depth: torch.Tensor  # int64 [n]  0 for the root
    mask: torch.Tensor  # bool [n, n]  row j sees row i (its ancestors and itself)
    positions: torch.Tensor  # int64 [n]  root position + depth

    @property
    def size(self) -> int:
        return self.tokens.numel()

    def paths(self) -> list[list[int]]:
        """Root-to-leaf row lists (for inspection and tests; acceptance works on the mask)."""
        is_parent = torch.zeros(self.size, dtype=torch.bool)
        is_parent[self.parents[1:]] = True
        leaves = (~is_parent).nonzero().flatten().tolist()
        return [self.mask[leaf].nonzero().flatten().tolist() for leaf in leaves]


def draft_cache(draft, capacity: int = 1024) -> KVBuffer:
    """The draft layer's KV for the accepted prefix (one layer, batch 1). Tree rows are written
    past `length` and forgotten by not committing them: no copies."""
    c, p = draft.config, draft.fc.weight
    return KVBuffer(1, c.num_key_value_heads, c.head_dim, capacity, p.dtype, p.device)


class Drafter:
    """Runs the draft head over prefix rows and grows the dynamic tree."""

    def __init__(self, draft, embed, capacity: int = 1024):
        self.draft = draft
        self.embed = embed  # target token ids [..] -> embeddings [.., H]
        self.cache = draft_cache(draft, capacity)
        self.h_last: torch.Tensor | None = None  # pre-norm output of the last prefix row [H]

    def reset(self) -> None:
        self.cache.reset()
        self.h_last = None

    @torch.no_grad()
    def extend(self, aux: torch.Tensor, next_ids: torch.Tensor, start_pos: int) -> None:
        """Append prefix rows: aux [m, 3Ht] of target positions start_pos.., next_ids [m] = the
        tokens at start_pos + 1.. (the last one is the new root)."""
        d, c = self.draft, self.cache
        m = next_ids.numel()
        if m == 0:
            return
        if start_pos != c.length:
            raise ValueError(
                f"draft extend at position {start_pos}, but the draft cache holds {c.length}"
            )
        c.reserve(m)
        hidden = d.fuse(aux)[None]
        pos = torch.arange(start_pos, start_pos + m, device=hidden.device)[None]
        q, k, v = d.qkv(self.embed(next_ids)[None], hidden, pos)
        keys, values = c.write(0, start_pos, k, v)
        # m == 1 sees the whole prefix (mask None); several rows are causal among themselves.
        out = _attend(q, keys, values, None)
        h = d.finish(out, hidden)
        c.commit(m)
        self.h_last = h[0, -1]

    @torch.no_grad()
    def grow(self, root: int | torch.Tensor, depth: int, top_k: int, total_tokens: int) -> Tree:
        """The dynamic tree below `root` (the token at position P = cache length)."""
        d, c = self.draft, self.cache
        if self.h_last is None:
            raise RuntimeError("grow() before extend(): the draft has no prefix")
        if depth < 1 or top_k < 1 or total_tokens < 1:
            raise ValueError(
                f"tree needs depth, top_k, total_tokens >= 1 (got {depth}, {top_k}, {total_tokens})"
            )
        dev = self.h_last.device
        root_pos = c.length
        c.reserve(top_k * depth)

        logp = F.log_softmax(d.logits(self.h_last).float(), dim=-1)
        top = torch.topk(logp, top_k)
        scores = top.values  # [k] cumulative log-probs of the frontier
        ids = d.draft_to_target(top.indices)  # [k] target ids of the frontier
        hidden = self.h_last.expand(top_k, -1)  # [k, H] input hidden of each frontier row
        # Every candidate node, per level: target ids, scores, parent (index into all candidates).
        all_ids, all_scores = [ids], [scores]
        all_parents = [torch.full((top_k,), -1, dtype=torch.long, device=dev)]
        frontier = torch.arange(top_k, device=dev)  # candidate index of each frontier row
        fmask = torch.eye(top_k, dtype=torch.bool, device=dev)  # frontier row -> tree rows so far
        n_cand = top_k
        eye = fmask
        for level in range(1, depth):
            # Run the draft on the frontier: rows at [root_pos + (level-1)*k, + k).
            start = root_pos + (level - 1) * top_k
            pos = torch.full((1, top_k), root_pos + level - 1, device=dev)
            q, k, v = d.qkv(self.embed(ids)[None], hidden[None], pos)
            keys, values = c.write(0, start, k, v)
            allowed = torch.ones(top_k, start + top_k, dtype=torch.bool, device=dev)
            allowed[:, root_pos:] = fmask
            out = d.finish(_attend(q, keys, values, allowed), hidden[None])[0]  # [k, H]
            logp = F.log_softmax(d.logits(out).float(), dim=-1)
            top = torch.topk(logp, top_k)  # [k, k] children of each frontier row
            cand = (scores[:, None] + top.values).flatten()  # [k*k]
            cand_ids = d.draft_to_target(top.indices.flatten())
            cand_parent = frontier.repeat_interleave(top_k)
            all_ids.append(cand_ids)
            all_scores.append(cand)
            all_parents.append(cand_parent)
            best = torch.topk(cand, top_k).indices  # next frontier, among this level's candidates
            src = best // top_k  # frontier row each one came from
            scores, ids = cand[best], cand_ids[best]
            hidden = out[src]
            frontier = n_cand + best
            fmask = torch.cat((fmask[src], eye), dim=1)
            n_cand += top_k * top_k
        return _select(
            torch.cat(all_ids),
            torch.cat(all_scores),
            torch.cat(all_parents),
            depth,
            top_k,
            total_tokens,
            root,
            root_pos,
        )


def _attend(q, k, v, mask):
    """The draft's attention (models.draft.attend) with GQA inside SDPA: no per-step copy of the
    whole prefix's K/V into every query head (2.7x faster at 2k cached tokens on this CPU)."""
    t, s = q.shape[2], k.shape[2]
    if mask is None and t > 1:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]
    )


def _select(ids, scores, parents, depth, top_k, total_tokens, root, root_pos) -> Tree:
    """The best `total_tokens` candidates as a tree with the root as row 0."""
    dev = ids.device
    n_cand = ids.numel()
    total = min(total_tokens, n_cand)
    # Stable sort of -score: ties go to the lower index, i.e. the ancestor (closure under ancestors).
    order = torch.sort(-scores, stable=True).indices[:total]
    chosen = torch.sort(order).values  # creation order: parents before children
    row_of = torch.full((n_cand + 1,), -1, dtype=torch.long, device=dev)
    row_of[chosen] = torch.arange(1, total + 1, device=dev)
    # parents == -1 (level 1) -> row 0 via the extra slot at the end of row_of.
    row_of[n_cand] = 0
    par = parents[chosen]
    par_rows = row_of[torch.where(par < 0, n_cand, par)]
    n = total + 1
    tokens = torch.empty(n, dtype=torch.long, device=dev)
    tokens[0] = root
    tokens[1:] = ids[chosen]
    parent_rows = torch.cat((torch.full((1,), -1, dtype=torch.long, device=dev), par_rows))
    # Level of each candidate from its index: k at level 1, then k*k per level.
    level = torch.where(chosen < top_k, 1, (chosen - top_k) // (top_k * top_k) + 2)
    depth_rows = torch.cat((torch.zeros(1, dtype=torch.long, device=dev), level))
    mask = torch.eye(n, dtype=torch.bool, device=dev)
    mask[:, 0] = True
    # Parents precede children, so copying the parent's row level by level completes the mask.
    for lvl in range(1, depth + 1):
        rows = (depth_rows == lvl).nonzero().flatten()
        if rows.numel() == 0:
            break
        mask[rows] |= mask[parent_rows[rows]]
    return Tree(tokens, parent_rows, depth_rows, mask, root_pos + depth_rows)
