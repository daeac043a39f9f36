"""The data stage: sources -> regenerated conversations -> token shards -> draft vocab -> features.

Layout of `<run_dir>/data/` (paths and keys: eagle3.data.shards):
  regen/00000.json                 shard 0's conversations after regeneration (+ skips, stats)
  tokens/00000.safetensors         its TokenSamples (ids + loss mask): the shard is done when this
                                   file exists and carries the shard's current key
  vocab.safetensors                the draft vocabulary (d2t, t2d; eagle3.data.vocab)
  features/{train,val}-00000.safetensors   aux + last hidden state (when data.features)
  manifest.json                    written last (docs/CONTRACTS.md §5; eagle3.data.manifest)
Every file is written atomically (temp file + rename), so a killed run loses at most the shard in
flight and a rerun skips what is done. A key (sha256 of everything that decides a file's content)
is stored in each file: change the recipe and only what it affects is redone. Training reads the
result through eagle3.data.reader.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eagle3.data import manifest as mf
from eagle3.data.chat import TemplateError, build_sample, chat_template_sha256
from eagle3.data.features import (
    bytes_per_token,
    read_token_shard,
    shard_metadata,
    write_feature_shards,
    write_token_shard,
)
from eagle3.data.progress import Progress
from eagle3.data.regenerate import RegenResult, RegenStats, regenerate_hf, regenerate_openai
from eagle3.data.samples import TokenSample
from eagle3.data.shards import (
    ShardPaths,
    locked,
    prune,
    read_regen,
    regen_key,
    token_key,
    write_regen,
)
from eagle3.data.sources import (
    Conversation,
    Skip,
    SourceError,
    load_conversations,
    reason_counts,
    require_usable,
)
from eagle3.data.vocab import VOCAB_FILE, DraftVocab, build_draft_vocab, count_tokens, save_vocab
from eagle3.models.target import TargetSource

Callback = Callable[[dict[str, Any]], None]


def split_val_ids(sample_ids: list[str], fraction: float) -> set[str]:
    """Validation ids: those whose sha256 falls below `fraction` (stable as data grows); at least
    one when fraction > 0 and there are two samples or more."""
    if fraction <= 0 or not sample_ids:
        return set()
    score = {i: int(hashlib.sha256(i.encode()).hexdigest()[:12], 16) / 16**12 for i in sample_ids}
    val = {i for i, s in score.items() if s < fraction}
    if not val and len(sample_ids) > 1:
        val = {min(score, key=lambda i: (score[i], i))}
    return val


# --- one shard: regenerate, then tokenize ---------------------------------------------------------------
def tokenize_conversations(
    tokenizer, convs: list[Conversation], data
) -> tuple[list[TokenSample], list[Skip]]:
    samples, skipped = [], []
    for c in convs:
        turns = "last" if c.recorded_answer else data.turns
        try:
            samples.append(
                build_sample(tokenizer, c.messages, c.id, turns, data.max_len, data.long_policy)
            )
        except TemplateError as e:
            skipped.append(Skip(c.id, f"template: {e}"))
        except ValueError as e:
            skipped.append(Skip(c.id, str(e)))
    return samples, skipped


def _regenerate(convs, data, source: TargetSource, seed: int, on_batch) -> RegenResult:
    """Regenerate the answers of `convs`, except recorded answers of the target (traffic), which
    are kept as they are, in place."""
    todo = [c for c in convs if not c.recorded_answer]
    if not data.regenerate or not todo:
        return RegenResult(conversations=list(convs))
    if data.backend == "openai":
        res = regenerate_openai(
            data.endpoint, source.tokenizer(), todo, data, seed=seed, on_batch=on_batch
        )
    else:
        res = regenerate_hf(source.target(), todo, data, seed=seed, on_batch=on_batch)
    if len(todo) == len(convs):
        return res
    done = {c.id: c for c in res.conversations}
    res.conversations = [
        done[c.id] if c.id in done else c for c in convs if c.id in done or c.recorded_answer
    ]
    return res


def _run_shard(i, convs, data, source, template_sha, data_dir, on_batch) -> tuple[bool, RegenStats]:
    """Make shard i's token file; returns (resumed, regeneration stats)."""
    paths = ShardPaths.of(data_dir, i)
    rkey = regen_key(convs, data, source.identity, template_sha)
    tkey = token_key(rkey, data)
    meta = shard_metadata(paths.tokens) if paths.tokens.is_file() else {}
    if meta.get("key") == tkey:
        return True, RegenStats(**json.loads(meta["regen_stats"]))
    regen = read_regen(paths.regen, rkey)
    if regen is None:
        regen = _regenerate(convs, data, source, data.seed * 100_003 + i, on_batch)
        write_regen(paths.regen, rkey, regen)
    samples, skipped = tokenize_conversations(source.tokenizer(), regen.conversations, data)
    skipped = regen.skipped + skipped
    write_token_shard(
        paths.tokens,
        samples,
        metadata={
            "key": tkey,
            "skipped": json.dumps([[s.id, s.reason] for s in skipped]),
            "regen_stats": json.dumps(regen.stats.as_dict()),
        },
    )
    return False, regen.stats


# --- the stage -------------------------------------------------------------------------------------------
def run_data(
    recipe,
    progress: bool = True,
    callback: Callback | None = None,
    target=None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The whole data stage; idempotent and resumable. Returns the manifest (also written).

    `callback(event)` gets a dict after every shard ({"stage": "regenerate"|"features", ...}) and
    at the end ({"stage": "done", "digest"}). `target`: an already loaded Target for this recipe
    (otherwise it is loaded when needed). `data_dir`: default `<run_dir>/data` (a data.mix stage
    has its own, see eagle3.data.stages).
    """
    t0 = time.time()
    d = recipe.data
    data_dir = Path(data_dir) if data_dir is not None else recipe.run_path / "data"
    emit = callback or (lambda event: None)
    with locked(data_dir):
        loaded = load_conversations(recipe)
        require_usable(loaded)
        source = TargetSource.for_recipe(recipe, target)
        template_sha = chat_template_sha256(source.tokenizer())
        shards = [
            loaded.conversations[i : i + d.shard_size]
            for i in range(0, len(loaded.conversations), d.shard_size)
        ]
        if d.features and progress:  # an early word, before hours of regeneration
            per = bytes_per_token(source.config().hidden_size, d.feature_dtype)
            bound = len(loaded.conversations) * d.max_len * per
            print(
                f"features: at most {bound / 1e9:.3f} GB ({len(loaded.conversations):,} "
                f"conversations x max_len {d.max_len} x {per:,} bytes/token); "
                f"data.max_disk_gb is {d.max_disk_gb:g}; checked exactly before writing"
            )
        stats = _token_shards(shards, d, source, template_sha, data_dir, progress, emit)

        # Everything below is cheap or resumable per file: recomputed from the token shards.
        token_paths = [ShardPaths.of(data_dir, i).tokens for i in range(len(shards))]
        per_shard = [read_token_shard(p) for p in token_paths]
        samples = [s for rows in per_shard for s in rows]
        skipped = list(loaded.skipped)
        for p in token_paths:
            skipped += [Skip(a, b) for a, b in json.loads(shard_metadata(p)["skipped"])]
        val = _split(samples, skipped, d.val_fraction, data_dir, loaded.held_out, loaded.pinned)
        if d.features:
            source.target()  # the facts below are then the loaded model's
        vocab = _build_vocab([s for s in samples if s.sample_id not in val], source, d)
        save_vocab(data_dir / VOCAB_FILE, vocab)
        rows = [
            mf.Shard.of("tokens", p, data_dir, len(part))
            for p, part in zip(token_paths, per_shard, strict=True)
        ]
        features = mf.FeaturesInfo(written=False)
        if d.features:
            tkeys = [shard_metadata(p)["key"] for p in token_paths]
            features, feature_rows = write_feature_shards(
                source.target(), source.identity, per_shard, tkeys, val, d, data_dir, progress, emit
            )
            rows += feature_rows
        prune(data_dir, {data_dir / r.path for r in rows})

        aux_ids, identity = source.aux_layer_ids(), source.identity
        manifest = mf.DataManifest(
            version=mf.VERSION,
            recipe=recipe.name,
            target=mf.TargetInfo(**identity, kind=recipe.target.kind),
            aux_layer_ids=aux_ids,
            chat_template_sha256=template_sha,
            sources=[s.written() for s in loaded.sources],
            samples=mf.SamplesInfo.of(
                len(loaded.conversations) + len(loaded.skipped), samples, skipped, val
            ),
            tokens=mf.TokensInfo.of(samples),
            regeneration=mf.RegenerationInfo.of(d, stats),
            vocab=mf.VocabInfo.of(vocab, VOCAB_FILE),
            features=features,
            shards=rows,
            split=mf.Split(val_fraction=d.val_fraction, val_ids=sorted(val)),
            timing=mf.Timing(
                seconds=round(time.time() - t0, 3),
                regen_seconds=round(stats.seconds, 3),
                finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            ),
            digest_of=mf.DigestOf.of(
                samples,
                val,
                vocab,
                mf.FeatureIdentity(target=identity, aux_layer_ids=aux_ids, dtype=d.feature_dtype)
                if features.written
                else None,
            ),
        )
        mf.write_manifest(data_dir, manifest)
        emit({"stage": "done", "digest": manifest.digest})
        return manifest.to_dict()


def _token_shards(shards, data, source, template_sha, data_dir, progress, emit) -> RegenStats:
    """Every shard's token file (regenerating what is not done); the summed regeneration stats."""
    stats = RegenStats()
    bar = Progress(sum(map(len, shards)), progress, "regenerate" if data.regenerate else "tokenize")
    try:
        for i, convs in enumerate(shards):
            bar.shard_start(convs)
            resumed, st = _run_shard(i, convs, data, source, template_sha, data_dir, bar.on_batch)
            stats.add(st)
            bar.shard_done(len(convs), resumed)
            emit(
                {
                    "stage": "regenerate",
                    "shard": i,
                    "shards": len(shards),
                    "resumed": resumed,
                    "conversations": len(convs),
                    "new_tokens": st.new_tokens,
                }
            )
    finally:
        bar.close()
    return stats


def _split(
    samples: list[TokenSample],
    skipped: list[Skip],
    fraction: float,
    data_dir,
    held_out: set[str] = frozenset(),
    pinned: set[str] = frozenset(),
) -> set[str]:
    """The validation ids: by hash, except samples whose source split them (`pinned`; traffic
    holds out its newest, `held_out`). Refuses duplicate sample ids and a split that leaves
    nothing to train."""
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        dup = [k for k, v in Counter(ids).items() if v > 1][:5]
        raise RuntimeError(f"duplicate sample ids in {data_dir}/tokens: {dup}")
    val = split_val_ids([i for i in ids if i not in pinned], fraction)
    val |= {i for i in ids if i in held_out}
    if all(i in val for i in ids):
        counts = ", ".join(f"{n} x {r}" for r, n in reason_counts(skipped).items())
        raise SourceError(
            f"no training sample survived in {data_dir}: {len(samples)} samples, "
            f"{len(skipped)} skipped ({counts or 'none'}); first: "
            f"{[(s.id, s.reason) for s in skipped[:3]]}"
        )
    return val


def kept_vocab(ckpt_dir: str | Path, counts: torch.Tensor) -> DraftVocab:
    """The draft vocabulary of the checkpoint in `ckpt_dir` (data.vocab_from), with its coverage
    of this data's trainable tokens (`counts`: their frequencies over the target vocabulary)."""
    from eagle3.models.checkpoint import read_tensors

    t = read_tensors(ckpt_dir)
    d2t, t2d = t["d2t"].long(), t["t2d"].bool()
    if len(t2d) != len(counts):
        raise ValueError(
            f"data.vocab_from {ckpt_dir}: its draft maps a target vocabulary of {len(t2d)} "
            f"tokens, this target has {len(counts)}"
        )
    total = int(counts.sum())
    coverage = float(counts[t2d].sum()) / total if total else 0.0
    return DraftVocab(d2t=d2t, t2d=t2d, coverage=coverage, seen=int((counts > 0).sum()), padded=0)


def _build_vocab(train: list[TokenSample], source: TargetSource, data) -> DraftVocab:
    """The draft vocabulary from the trainable tokens of the training samples (or data.vocab_from's,
    kept)."""
    vocab_size = source.config().vocab_size
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in train:
        counts += count_tokens(vocab_size, s.input_ids, s.loss_mask)
    if data.vocab_from:  # fine-tuning a head keeps its vocabulary
        return kept_vocab(data.vocab_from, counts)
    return build_draft_vocab(counts, data.draft_vocab_size)
