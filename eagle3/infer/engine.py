"""The speculative generator (EAGLE-3 head + EAGLE-2 dynamic tree) and the plain AR baseline.

One cycle: the draft grows a tree below the root (the last sampled token), the target verifies
every tree row in ONE forward on top of its KV cache, acceptance picks a root path and a bonus
token, and both caches keep only that path (the runner compacts rows in place; the draft appends
the accepted rows' aux features). Both decoders run on the same runner, so `ar` is a fair
engine-internal baseline.

tau = tokens emitted by verification forwards / verification forwards (the bonus token counts;
the first token, sampled from the prefill, counts in neither).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eagle3.infer.lookup import graft_chain, prompt_lookup
from eagle3.infer.padding import pad_tree, padded_sizes, verify_costs
from eagle3.infer.runner import Runner, make_runner, synced_time
from eagle3.infer.tree import Drafter
from eagle3.infer.verify import accept_greedy, accept_sample, argmax, sample, warp_probs


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens (EOS included when it ended the generation)
    tau: float
    accept_lengths: list[int]  # tokens gained per verification forward (accepted drafts + bonus)
    timings: dict[str, float]  # seconds: prefill, draft, verify, accept, total
    stop_reason: str  # eos | stop | length
    # alpha bookkeeping: attempts[i] / accepts[i] of draft depth i + 1 given depth i accepted.
    depth_attempts: list[int] = field(default_factory=list)
    depth_accepts: list[int] = field(default_factory=list)

    @property
    def cycles(self) -> int:
        return len(self.accept_lengths)

    @property
    def tokens_per_s(self) -> float:
        t = self.timings.get("total", 0.0)
        return len(self.tokens) / t if t > 0 else 0.0


class _Sampler:
    """Greedy at temperature 0, else the warped distribution with a seeded generator."""

    def __init__(self, temperature: float, top_p: float, top_k: int, seed: int | None):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(0 if seed is None else seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(argmax(logits))
        return sample(
            warp_probs(logits.cpu(), self.temperature, self.top_p, self.top_k), self.generator
        )


class _Stopper:
    """EOS, stop strings and the token budget; `cut` returns how many new tokens to keep."""

    def __init__(self, eos: list[int], stop: list[str], tokenizer, max_new_tokens: int):
        self.eos = set(eos)
        self.stop = [s for s in stop if s]
        self.tok = tokenizer
        self.max_new = max_new_tokens
        self.reason = "length"

    def cut(self, out: list[int], n_new: int) -> int | None:
        """None: go on. Else the number of tokens of `out` to keep (out has n_new fresh tokens)."""
        start = len(out) - n_new
        for i in range(start, len(out)):
            if out[i] in self.eos:
                self.reason = "eos"
                return min(i + 1, self.max_new)
        if self.stop and self.tok is not None:
            for i in range(start, len(out)):
                # Only the tail can hold a new match; decode a bounded window.
                text = self.tok.decode(out[max(0, i - 32) : i + 1])
                if any(s in text for s in self.stop):
                    self.reason = "stop"
                    return min(i + 1, self.max_new)
        if len(out) >= self.max_new:
            self.reason = "length"
            return self.max_new
        return None


# A tree may be verified up to this many rows wider than it is, when that is cheaper.
PAD_HEADROOM = 4


class PromptTooLong(ValueError):
    """A prompt that, with the tokens asked for, does not fit the target's context."""


def check_prompt_fits(target, input_ids, max_new_tokens: int, index: int | None = None) -> None:
    """Refuse, before any forward, a prompt whose answer would run past the target's context."""
    ctx = getattr(getattr(target, "config", None), "max_position_embeddings", None)
    n = len(input_ids)
    if ctx and n + max_new_tokens > ctx:
        which = "the prompt" if index is None else f"prompt {index}"
        raise PromptTooLong(
            f"{which} has {n:,} tokens; with max_new_tokens {max_new_tokens} it needs "
            f"{n + max_new_tokens:,} positions, but the target's context is {ctx:,}: shorten "
            "the prompt or lower max_new_tokens"
        )


@dataclass
class _Start:
    temperature: float
    sampler: _Sampler
    stopper: _Stopper
    first: int
    t0: float
    t_prefill: float


class SpecEngine:
    """EAGLE-3 speculative decoding for batch 1 on any Runner."""

    def __init__(
        self, target, draft, infer_cfg, runner: Runner | None = None, capacity: int = 1024
    ):
        self.target = target
        self.draft = draft.to(device=target.device).eval() if draft is not None else None
        self.cfg = infer_cfg
        self.runner = runner or make_runner(target, getattr(infer_cfg, "backend", "hf"), capacity)
        self.drafter = Drafter(self.draft, target.embed, capacity) if draft is not None else None
        # pad_sizes[n - 1]: the row count a tree of n rows is verified at when infer.pad_verify is
        # on; measured on the first such generate (tests may preset it to force padding), again
        # when a larger tree or another thread count needs it.
        self.pad_sizes: list[int] | None = None
        self._pad_threads = 0

    # --- settings -----------------------------------------------------------------------------
    def tree_shape(self) -> tuple[int, int, int]:
        """(depth, top_k, total_tokens); chain mode is top_k = 1 with total = depth."""
        c = self.cfg
        if c.mode == "chain":
            return c.depth, 1, c.depth
        return c.depth, c.top_k, c.total_tokens

    def max_tree_rows(self) -> int:
        """The most rows one verify can hold: the root, the draft tree and a lookup chain."""
        return 1 + self.tree_shape()[2] + self.cfg.lookup_tokens

    def _pad_table(self) -> list[int] | None:
        """The verify row counts for infer.pad_verify (None when off); measures them when the
        table is missing, too short for this tree shape, or from another thread count."""
        if not self.cfg.pad_verify:
            return None
        rows = self.max_tree_rows() + PAD_HEADROOM
        threads = torch.get_num_threads()
        preset = self.pad_sizes is not None and not self._pad_threads
        stale = self.pad_sizes is None or len(self.pad_sizes) < rows
        if not preset and (stale or threads != self._pad_threads):
            costs = verify_costs(self.runner, self.target.device, rows)
            self.pad_sizes, self._pad_threads = padded_sizes(costs), threads
        return self.pad_sizes

    def _args(self, temperature, max_new_tokens, stop):
        c = self.cfg
        temperature = c.temperature if temperature is None else temperature
        max_new = c.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new})")
        stop = list(c.stop if stop is None else stop)
        return temperature, max_new, stop

    # --- EAGLE-3 -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: list[int],
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> GenerationResult:
        if self.drafter is None:
            raise RuntimeError("SpecEngine has no draft head: use generate_ar")
        temperature, max_new, stop = self._args(temperature, max_new_tokens, stop)
        check_prompt_fits(self.target, input_ids, max_new)
        depth, top_k, total = self.tree_shape()
        sampler = _Sampler(temperature, self.cfg.top_p, self.cfg.top_k_sampling, seed)
        stopper = _Stopper(self.target.eos_token_ids, stop, self.target.tokenizer, max_new)
        runner, drafter, dev = self.runner, self.drafter, self.target.device
        t_draft = t_verify = t_accept = 0.0
        attempts, accepts = [0] * depth, [0] * depth
        lengths: list[int] = []
        pads = self._pad_table()  # before t0: measured once per engine, not per generation

        t0 = synced_time(dev)
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=dev)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError("generate: input_ids must be a non-empty list of token ids")
        runner.reset()
        drafter.reset()
        logits, aux = runner.prefill(ids, last_only=True)
        root = sampler(logits[-1])
        out = [root]
        context = ids.tolist() + out  # what prompt lookup searches: prompt + output so far
        # Draft prefix: row t = aux(t) + embed(token t + 1); the last row carries the root.
        drafter.extend(aux, torch.cat((ids[1:], ids.new_tensor([root]))), 0)
        t1 = synced_time(dev)
        t_prefill = t1 - t0
        keep = stopper.cut(out, 1)
        while keep is None:
            ta = synced_time(dev)
            tree = drafter.grow(root, depth, top_k, total)
            if self.cfg.lookup_tokens:
                chain = prompt_lookup(context, self.cfg.lookup_ngram, self.cfg.lookup_tokens)
                tree = graft_chain(tree, chain)
            n = tree.size
            verified = pad_tree(tree, pads[n - 1]) if pads and n <= len(pads) else tree
            tb = synced_time(dev)
            logits, aux = runner.verify(verified.tokens, verified.positions, verified.mask)
            logits, aux = logits[:n], aux[:n]  # the padding rows' outputs mean nothing
            tc = synced_time(dev)
            if temperature > 0:
                rows, bonus = accept_sample(
                    tree,
                    logits.cpu(),
                    temperature,
                    self.cfg.top_p,
                    self.cfg.top_k_sampling,
                    sampler.generator,
                )
                rows = rows.to(dev)
            else:
                rows, bonus = accept_greedy(tree, logits)
            runner.keep(rows)
            new = tree.tokens[rows[1:]].tolist() + [bonus]
            m = len(new) - 1  # accepted draft tokens
            # Depth i + 1 was tried when depth i was accepted and the tree reaches that deep
            # (alpha covers the draft's depths; a grafted lookup chain may reach deeper).
            for i in range(min(int(tree.depth.max()), m + 1, depth)):
                attempts[i] += 1
                accepts[i] += i < m
            out.extend(new)
            context.extend(new)
            lengths.append(len(new))
            keep = stopper.cut(out, len(new))
            td = synced_time(dev)
            if keep is None:
                # Feed the accepted rows' features to the draft (part of the next draft phase).
                start = drafter.cache.length
                drafter.extend(aux[rows], torch.as_tensor(new, device=dev), start)
                root = bonus
            te = synced_time(dev)
            t_draft += tb - ta + te - td
            t_verify += tc - tb
            t_accept += td - tc
        total_t = synced_time(dev) - t0
        out = out[:keep]
        timings = dict(
            prefill=t_prefill, draft=t_draft, verify=t_verify, accept=t_accept, total=total_t
        )
        tau = sum(lengths) / len(lengths) if lengths else 0.0
        return GenerationResult(out, tau, lengths, timings, stopper.reason, attempts, accepts)

    # --- plain autoregressive decoding on the same runner --------------------------------------
    @torch.no_grad()
    def start_target_only(self, input_ids, temperature, max_new_tokens, stop, seed) -> _Start:
        """What a decoder without a draft (AR, prompt lookup) does first: settings, sampler,
        stopper, the prompt's prefill and the first token, timed from before the prefill."""
        temperature, max_new, stop = self._args(temperature, max_new_tokens, stop)
        check_prompt_fits(self.target, input_ids, max_new)
        sampler = _Sampler(temperature, self.cfg.top_p, self.cfg.top_k_sampling, seed)
        stopper = _Stopper(self.target.eos_token_ids, stop, self.target.tokenizer, max_new)
        runner, dev = self.runner, self.target.device
        t0 = synced_time(dev)
        runner.reset()
        logits, _ = runner.prefill(
            torch.as_tensor(input_ids, dtype=torch.long, device=dev), last_only=True
        )
        first = sampler(logits[-1])
        return _Start(temperature, sampler, stopper, first, t0, synced_time(dev) - t0)

    def generate_ar(
        self,
        input_ids: list[int],
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> GenerationResult:
        s = self.start_target_only(input_ids, temperature, max_new_tokens, stop, seed)
        sampler, stopper, t0, t_prefill = s.sampler, s.stopper, s.t0, s.t_prefill
        runner, dev = self.runner, self.target.device
        tok = s.first
        out = [tok]
        one = torch.ones(1, 1, dtype=torch.bool, device=dev)
        row0 = torch.zeros(1, dtype=torch.long, device=dev)
        keep = stopper.cut(out, 1)
        while keep is None:
            pos = torch.full((1,), runner.cache_len, dtype=torch.long, device=dev)
            logits, _ = runner.verify(torch.full((1,), tok, dtype=torch.long, device=dev), pos, one)
            runner.keep(row0)
            tok = sampler(logits[0])
            out.append(tok)
            keep = stopper.cut(out, 1)
        total_t = synced_time(dev) - t0
        steps = len(out) - 1
        timings = dict(
            prefill=t_prefill, draft=0.0, verify=total_t - t_prefill, accept=0.0, total=total_t
        )
        return GenerationResult(out[:keep], 1.0, [1] * steps, timings, stopper.reason)


# --- one-shot helper for the CLI and the inference flow ---------------------------------------------
def load_engine(recipe, draft_dir) -> SpecEngine:
    from eagle3.models.checkpoint import load_draft
    from eagle3.models.target import load_target

    target = load_target(recipe.target, recipe.cache_path)
    draft = load_draft(draft_dir, device=target.device, dtype=draft_dtype(recipe))
    return SpecEngine(target, draft, tuned_infer(recipe.infer, draft))


def draft_dtype(recipe) -> str:
    """infer.draft_dtype, with auto resolved to the target's dtype."""
    d = recipe.infer.draft_dtype
    return recipe.target.dtype if d == "auto" else d


def tuned_infer(infer_cfg, draft):
    """The recipe's infer settings, with tree settings from the checkpoint when auto-tuned."""
    tuned = (draft.config.eagle3 or {}).get("tree") if draft is not None else None
    if not infer_cfg.autotune or not tuned:
        return infer_cfg
    keys = ("mode", "total_tokens", "depth", "top_k")
    return infer_cfg.model_copy(update={k: tuned[k] for k in keys if k in tuned})


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    from eagle3.data.chat import encode_chat

    return list(encode_chat(tokenizer, messages, add_generation_prompt=True))


def generate_text(recipe, draft_dir, prompt: str, temperature=None, max_new_tokens=None) -> dict:
    engine = load_engine(recipe, draft_dir)
    tok = engine.target.tokenizer
    ids = encode_prompt(tok, [{"role": "user", "content": prompt}])
    res = engine.generate(
        ids, temperature=temperature, max_new_tokens=max_new_tokens, seed=recipe.seed
    )
    text = tok.decode(res.tokens, skip_special_tokens=True)
    return {"text": text, "tokens": res.tokens, "tau": res.tau, "tokens_per_s": res.tokens_per_s}
