"""The data stage: sources -> regenerated conversations -> token shards -> draft vocab -> features.

Layout of `<run_dir>/data/`:
  regen/00000.json                 shard 0's conversations after regeneration (+ skips, stats)
  tokens/00000.safetensors         its TokenSamples (ids + loss mask): the shard is done when this
                                   file exists and carries the shard's current key
  vocab.safetensors                the draft vocabulary (d2t, t2d)
  features/{train,val}-00000.safetensors   aux + last hidden state (when data.features)
  manifest.json                    written last (docs/CONTRACTS.md §5)
Every file is written atomically (temp file + rename), so a killed run loses at most the shard in
flight and a rerun skips what is done. A key (sha256 of everything that decides a file's content)
is stored in each file: change the recipe and only what it affects is redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eagle3.data import manifest as mf
from eagle3.data.chat import TemplateError, build_sample, chat_template_sha256
from eagle3.data.features import (
    DTYPES,
    bytes_per_token,
    extract_features,
    read_token_shard,
    shard_metadata,
    write_shard,
    write_token_shard,
)
from eagle3.data.regenerate import RegenResult, RegenStats, regenerate_hf, regenerate_openai
from eagle3.data.samples import TokenSample
from eagle3.data.sources import (
    Conversation,
    Skip,
    SourceError,
    load_conversations,
    reason_counts,
    require_usable,
)
from eagle3.data.vocab import DraftVocab, build_draft_vocab, count_tokens

log = logging.getLogger(__name__)
Callback = Callable[[dict[str, Any]], None]


class DiskBudgetError(ValueError):
    """The feature shards would need more disk than data.max_disk_gb allows."""


class DataLockedError(RuntimeError):
    pass


def _sha(obj: Any) -> str:
    return hashlib.sha256(mf.canonical(obj)).hexdigest()


# --- the target, loaded only when needed ------------------------------------------------------------
class _Target:
    """Loads the model only for HF regeneration or features; the tokenizer alone otherwise."""

    def __init__(self, recipe, target=None):
        self.recipe = recipe
        self._target = target
        self._tokenizer = None

    @property
    def loaded(self) -> bool:
        return self._target is not None

    def model(self):
        if self._target is None:
            from eagle3.models.target import load_target

            self._target = load_target(self.recipe.target, self.recipe.cache_path)
        return self._target

    def tokenizer(self):
        if self._target is not None:
            return self._target.tokenizer
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.recipe)
        return self._tokenizer


def load_tokenizer(recipe):
    """The target's tokenizer without its weights."""
    from transformers import AutoTokenizer

    from eagle3.models import target as tm

    cfg, cache = recipe.target, recipe.cache_path
    if cfg.kind == "tiny":
        return tm.load_smollm2_tokenizer(cache)
    if cfg.kind == "embedded":
        return AutoTokenizer.from_pretrained(tm.embedded_model_dir(cache))
    if cfg.kind == "gguf":
        return AutoTokenizer.from_pretrained(tm.gguf_model_dir(Path(cfg.path), cache))
    return AutoTokenizer.from_pretrained(cfg.path, revision=cfg.revision)


def target_identity(recipe) -> dict[str, Any]:
    """id + revision of the target without loading it (the tiny target: a hash of its config)."""
    from eagle3.io import sha256_file
    from eagle3.models import target as tm

    cfg = recipe.target
    if cfg.kind == "tiny":
        return {
            "id": f"tiny-llama(seed={cfg.tiny.seed})",
            "revision": "seeded:" + _sha(cfg.tiny.model_dump())[:16],
        }
    if cfg.kind == "embedded":
        return {"id": tm.EMBEDDED_ID, "revision": tm.EMBEDDED_SHA256}
    if cfg.kind == "gguf":
        return {"id": str(cfg.path), "revision": sha256_file(cfg.path)}
    return {"id": cfg.path, "revision": cfg.revision or tm._local_revision(cfg.path)}


def _target_config(recipe):
    """The target's HF config, read without its weights (None for the tiny target)."""
    from transformers import AutoConfig

    from eagle3.models import target as tm

    cfg, cache = recipe.target, recipe.cache_path
    if cfg.kind == "tiny":
        return None
    if cfg.kind == "embedded":
        return AutoConfig.from_pretrained(tm.embedded_model_dir(cache))
    if cfg.kind == "gguf":
        return AutoConfig.from_pretrained(tm.gguf_model_dir(Path(cfg.path), cache))
    return AutoConfig.from_pretrained(cfg.path, revision=cfg.revision)


def target_facts(recipe, holder: _Target) -> tuple[int, list[int]]:
    """(vocab size, aux layer ids) of the target, without loading its weights when avoidable."""
    from eagle3.models.draft import default_aux_layer_ids

    if holder.loaded:
        t = holder.model()
        return t.vocab_size, t.aux_layer_ids
    if recipe.target.kind == "tiny":
        vocab, layers = len(holder.tokenizer()), recipe.target.tiny.num_hidden_layers
    else:
        hf = _target_config(recipe)
        vocab, layers = hf.vocab_size, hf.num_hidden_layers
    return vocab, list(recipe.target.aux_layers or default_aux_layer_ids(layers))


def target_hidden_size(recipe, holder: _Target) -> int:
    if holder.loaded:
        return holder.model().hidden_size
    if recipe.target.kind == "tiny":
        return recipe.target.tiny.hidden_size
    return _target_config(recipe).hidden_size


# --- split ----------------------------------------------------------------------------------------------
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


# --- keys: everything that decides a file's content ------------------------------------------------------
def regen_key(convs: list[Conversation], recipe, identity: dict, template_sha: str) -> str:
    d = recipe.data
    return _sha(
        {
            "conversations": [[c.id, c.messages] for c in convs],
            "target": identity,
            "template": template_sha,
            "regen": {
                "on": d.regenerate,
                "backend": d.backend,
                "temperature": d.temperature,
                "max_new_tokens": d.max_new_tokens,
                "max_len": d.max_len,
                "seed": d.seed,
            }
            if d.regenerate
            else False,
        }
    )


def token_key(rkey: str, recipe) -> str:
    d = recipe.data
    return _sha({"regen": rkey, "turns": d.turns, "max_len": d.max_len, "long": d.long_policy})


# --- one shard: regenerate, then tokenize ---------------------------------------------------------------
def _regenerate(convs, recipe, holder: _Target, seed: int, on_batch) -> RegenResult:
    d = recipe.data
    if not d.regenerate:
        return RegenResult(conversations=list(convs))
    if d.backend == "openai":
        return regenerate_openai(
            d.endpoint, holder.tokenizer(), convs, d, seed=seed, on_batch=on_batch
        )
    return regenerate_hf(holder.model(), convs, d, seed=seed, on_batch=on_batch)


def _read_regen(path: Path, key: str) -> RegenResult | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("key") != key:
        return None
    try:
        return RegenResult(
            conversations=[
                Conversation(c["id"], c["messages"], c["source"]) for c in obj["conversations"]
            ],
            skipped=[Skip(s["id"], s["reason"]) for s in obj["skipped"]],
            stats=RegenStats(**obj["stats"]),
        )
    except (KeyError, TypeError):  # not our layout: regenerate
        return None


def tokenize_conversations(
    tokenizer, convs: list[Conversation], recipe
) -> tuple[list[TokenSample], list[Skip]]:
    d = recipe.data
    samples, skipped = [], []
    for c in convs:
        try:
            samples.append(
                build_sample(tokenizer, c.messages, c.id, d.turns, d.max_len, d.long_policy)
            )
        except TemplateError as e:
            skipped.append(Skip(c.id, f"template: {e}"))
        except ValueError as e:
            skipped.append(Skip(c.id, str(e)))
    return samples, skipped


def _shard_paths(data_dir: Path, i: int) -> dict[str, Path]:
    return {
        "regen": data_dir / "regen" / f"{i:05d}.json",
        "tokens": data_dir / "tokens" / f"{i:05d}.safetensors",
        "train": data_dir / "features" / f"train-{i:05d}.safetensors",
        "val": data_dir / "features" / f"val-{i:05d}.safetensors",
    }


def _run_shard(
    i, convs, recipe, holder, identity, template_sha, data_dir, on_batch
) -> tuple[bool, RegenStats]:
    """Make shard i's token file; returns (resumed, regeneration stats)."""
    paths = _shard_paths(data_dir, i)
    rkey = regen_key(convs, recipe, identity, template_sha)
    tkey = token_key(rkey, recipe)
    meta = shard_metadata(paths["tokens"]) if paths["tokens"].is_file() else {}
    if meta.get("key") == tkey:
        return True, RegenStats(**json.loads(meta["regen_stats"]))
    regen = _read_regen(paths["regen"], rkey)
    if regen is None:
        regen = _regenerate(convs, recipe, holder, recipe.data.seed * 100_003 + i, on_batch)
        mf.write_json_atomic(
            paths["regen"],
            {
                "key": rkey,
                "conversations": [
                    {"id": c.id, "source": c.source, "messages": c.messages}
                    for c in regen.conversations
                ],
                "skipped": [{"id": s.id, "reason": s.reason} for s in regen.skipped],
                "stats": regen.stats.as_dict(),
            },
        )
    samples, skipped = tokenize_conversations(holder.tokenizer(), regen.conversations, recipe)
    skipped = regen.skipped + skipped
    write_token_shard(
        paths["tokens"],
        samples,
        metadata={
            "key": tkey,
            "skipped": json.dumps([[s.id, s.reason] for s in skipped]),
            "regen_stats": json.dumps(regen.stats.as_dict()),
        },
    )
    return False, regen.stats


# --- features --------------------------------------------------------------------------------------------
def check_disk(tokens: int, recipe, hidden: int, data_dir: Path) -> dict[str, Any]:
    """Say the disk need before writing; refuse above data.max_disk_gb (GB = 1e9 bytes)."""
    import shutil

    d = recipe.data
    per = bytes_per_token(hidden, d.feature_dtype)
    need = tokens * per
    # Feature files already written (a resumed run) count as available: they get rewritten at most.
    have = sum(p.stat().st_size for p in (data_dir / "features").glob("*.safetensors"))
    free = shutil.disk_usage(data_dir).free + have
    msg = (
        f"feature shards need about {need / 1e9:.3f} GB ({tokens:,} tokens x {per:,} bytes/token "
        f"at {d.feature_dtype}, target hidden {hidden}); data.max_disk_gb is {d.max_disk_gb:g}, "
        f"{free / 1e9:.1f} GB free"
    )
    log.info(msg)
    if need > d.max_disk_gb * 1e9:
        raise DiskBudgetError(
            f"refusing to write features: {msg}. Raise data.max_disk_gb, lower "
            "data.limit or data.max_len, or use train.features=online with "
            "data.features=false"
        )
    if need > free:
        raise DiskBudgetError(f"refusing to write features: {msg}, more than is free")
    return {"bytes_per_token": per, "estimated_bytes": need, "max_disk_gb": d.max_disk_gb}


def _write_features(
    i, samples, val, recipe, holder, identity, data_dir, tkey
) -> list[tuple[str, Path, int]]:
    """train/val feature files of shard i (skipped when present with the current key)."""
    d = recipe.data
    target = holder.model()
    paths = _shard_paths(data_dir, i)
    parts = {
        "train": [s for s in samples if s.sample_id not in val],
        "val": [s for s in samples if s.sample_id in val],
    }
    out, todo = [], {}
    for part, rows in parts.items():
        if not rows:
            paths[part].unlink(missing_ok=True)
            continue
        fkey = _sha(
            {
                "tokens": tkey,
                "target": identity,
                "aux": target.aux_layer_ids,
                "dtype": d.feature_dtype,
                "ids": [s.sample_id for s in rows],
            }
        )
        out.append((part, paths[part], len(rows)))
        if shard_metadata(paths[part]).get("key") != fkey:
            todo[part] = (rows, fkey)
    for part, (rows, fkey) in todo.items():
        feats = extract_features(target, rows, d.batch_size, DTYPES[d.feature_dtype])
        write_shard(paths[part], feats, DTYPES[d.feature_dtype], metadata={"key": fkey})
    return out


# --- the stage -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(data_dir: Path):
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataLockedError(f"another `eagle3 data` run is writing {data_dir}") from None
        for tmp in data_dir.rglob(".*.tmp"):  # left by a killed run (we hold the lock)
            tmp.unlink(missing_ok=True)
        yield


def _prune(data_dir: Path, keep: set[Path]) -> None:
    """Remove token and feature files of an earlier, larger plan so that nothing stale is listed
    or read. Regenerated answers (regen/, hours of work) stay: their key is checked before any
    use, so a later plan that holds the same shard again takes them as they are."""
    for sub in ("tokens", "features"):
        for p in (data_dir / sub).glob("*"):
            if p.is_file() and p not in keep:
                p.unlink()


def save_vocab(path: Path, vocab: DraftVocab) -> None:
    from eagle3.data.features import _save_atomic

    _save_atomic(
        {"d2t": vocab.d2t, "t2d": vocab.t2d},
        path,
        {"coverage": repr(vocab.coverage), "seen": str(vocab.seen), "padded": str(vocab.padded)},
    )


def load_vocab(data_dir: str | Path) -> DraftVocab:
    from safetensors import safe_open

    path = Path(data_dir) / "vocab.safetensors"
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


class _Progress:
    """One bar over conversations with the generation rate (tokens/s) and an ETA.

    Within a shard the bar moves by answers (a conversation of m messages needs about m/2), so a
    long shard does not sit still; at the end of a shard it is set exactly.
    """

    def __init__(self, total: int, enabled: bool, desc: str = "regenerate"):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            disable=not enabled,
            unit="conv",
            desc=desc,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}{postfix}]",
        )
        self.tokens, self.seconds, self.start, self.base, self.per_answer = 0, 0.0, 0.0, 0, 0.0

    def shard_start(self, convs: list[Conversation]) -> None:
        self.start, self.base = time.perf_counter(), self.bar.n
        self.per_answer = 2 * len(convs) / max(1, sum(len(c.messages) for c in convs))

    def on_batch(self, answers: int, new_tokens: int) -> None:
        self.tokens += new_tokens
        self.bar.update(min(answers * self.per_answer, self.bar.total - self.bar.n))
        rate = self.tokens / max(self.seconds + time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} tok/s")

    def shard_done(self, n: int, resumed: bool) -> None:
        if not resumed:
            self.seconds += time.perf_counter() - self.start
        self.bar.n = self.base + n
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


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
    with _locked(data_dir):
        loaded = load_conversations(recipe)
        require_usable(loaded)
        holder = _Target(recipe, target)
        identity = target_identity(recipe)
        template_sha = chat_template_sha256(holder.tokenizer())
        shards = [
            loaded.conversations[i : i + d.shard_size]
            for i in range(0, len(loaded.conversations), d.shard_size)
        ]
        if d.features and progress:  # an early word, before hours of regeneration
            per = bytes_per_token(target_hidden_size(recipe, holder), d.feature_dtype)
            bound = len(loaded.conversations) * d.max_len * per
            print(
                f"features: at most {bound / 1e9:.3f} GB ({len(loaded.conversations):,} "
                f"conversations x max_len {d.max_len} x {per:,} bytes/token); "
                f"data.max_disk_gb is {d.max_disk_gb:g}; checked exactly before writing"
            )
        stats = RegenStats()
        bar = _Progress(
            len(loaded.conversations), progress, "regenerate" if d.regenerate else "tokenize"
        )
        try:
            for i, convs in enumerate(shards):
                bar.shard_start(convs)
                resumed, st = _run_shard(
                    i, convs, recipe, holder, identity, template_sha, data_dir, bar.on_batch
                )
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

        # Everything below is cheap or resumable per file: recomputed from the token shards.
        token_paths = [_shard_paths(data_dir, i)["tokens"] for i in range(len(shards))]
        per_shard = [read_token_shard(p) for p in token_paths]
        samples = [s for rows in per_shard for s in rows]
        skipped = list(loaded.skipped)
        for p in token_paths:
            skipped += [Skip(a, b) for a, b in json.loads(shard_metadata(p)["skipped"])]
        ids = [s.sample_id for s in samples]
        if len(set(ids)) != len(ids):
            dup = [k for k, v in Counter(ids).items() if v > 1][:5]
            raise RuntimeError(f"duplicate sample ids in {data_dir}/tokens: {dup}")
        val = split_val_ids(ids, d.val_fraction)
        train = [s for s in samples if s.sample_id not in val]
        if not train:
            counts = ", ".join(f"{n} x {r}" for r, n in reason_counts(skipped).items())
            raise SourceError(
                f"no training sample survived in {data_dir}: {len(samples)} samples, "
                f"{len(skipped)} skipped ({counts or 'none'}); first: "
                f"{[(s.id, s.reason) for s in skipped[:3]]}"
            )

        if d.features:
            holder.model()
        vocab_size, aux_ids = target_facts(recipe, holder)
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for s in train:
            counts += count_tokens(vocab_size, s.input_ids, s.loss_mask)
        vocab = build_draft_vocab(counts, d.draft_vocab_size)
        save_vocab(data_dir / "vocab.safetensors", vocab)

        keep = {
            p
            for i in range(len(shards))
            for k, p in _shard_paths(data_dir, i).items()
            if k in ("regen", "tokens")
        }
        shard_rows = [
            mf.Shard(
                kind="tokens",
                path=str(p.relative_to(data_dir)),
                rows=len(rows),
                sha256=_file_sha(p),
            )
            for p, rows in zip(token_paths, per_shard, strict=True)
        ]
        features_info = mf.FeaturesInfo(written=False)
        if d.features:
            target = holder.model()
            total = sum(len(s) for s in samples)
            features_info = mf.FeaturesInfo(
                written=True,
                dtype=d.feature_dtype,
                **check_disk(total, recipe, target.hidden_size, data_dir),
            )
            if progress:
                print(
                    f"features: about {features_info.estimated_bytes / 1e9:.3f} GB "
                    f"({total:,} tokens x {features_info.bytes_per_token:,} bytes/token)"
                )
            from tqdm import tqdm

            for i in tqdm(range(len(shards)), desc="features", unit="shard", disable=not progress):
                tkey = shard_metadata(token_paths[i])["key"]
                for part, fpath, n in _write_features(
                    i, per_shard[i], val, recipe, holder, identity, data_dir, tkey
                ):
                    keep.add(fpath)
                    shard_rows.append(
                        mf.Shard(
                            kind=f"features/{part}",
                            path=str(fpath.relative_to(data_dir)),
                            rows=n,
                            sha256=_file_sha(fpath),
                        )
                    )
                emit({"stage": "features", "shard": i, "shards": len(shards)})
        _prune(data_dir, keep)

        feature_identity = (
            mf.FeatureIdentity(target=identity, aux_layer_ids=aux_ids, dtype=d.feature_dtype)
            if features_info.written
            else None
        )
        manifest = mf.DataManifest(
            version=mf.VERSION,
            recipe=recipe.name,
            target=mf.TargetInfo(**identity, kind=recipe.target.kind),
            aux_layer_ids=aux_ids,
            chat_template_sha256=template_sha,
            sources=[mf.SourceEntry(**s.as_dict()) for s in loaded.sources],
            samples=_samples_info(loaded, samples, skipped, val),
            tokens=mf.TokensInfo(
                total=int(sum(len(s) for s in samples)),
                trainable=int(sum(int(s.loss_mask.sum()) for s in samples)),
            ),
            regeneration=mf.RegenerationInfo(
                enabled=d.regenerate,
                backend=d.backend,
                temperature=d.temperature,
                max_new_tokens=d.max_new_tokens,
                seed=d.seed,
                **{k: v for k, v in stats.as_dict().items() if k != "seconds"},
            ),
            vocab=mf.VocabInfo(
                file="vocab.safetensors",
                size=int(len(vocab.d2t)),
                coverage=vocab.coverage,
                seen=vocab.seen,
                padded=vocab.padded,
            ),
            features=features_info,
            shards=shard_rows,
            split=mf.Split(val_fraction=d.val_fraction, val_ids=sorted(val)),
            timing=mf.Timing(
                seconds=round(time.time() - t0, 3),
                regen_seconds=round(stats.seconds, 3),
                finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            ),
            digest_of=mf.DigestOf(
                samples_sha256=mf.samples_sha256(samples),
                val_ids=sorted(val),
                vocab_d2t_sha256=mf.tensor_sha256(vocab.d2t),
                features=feature_identity,
            ),
        )
        mf.write_manifest(data_dir, manifest)
        emit({"stage": "done", "digest": manifest.digest})
        return manifest.to_dict()


def _file_sha(path: Path) -> str:
    from eagle3.io import sha256_file

    return sha256_file(path)


def _samples_info(loaded, samples, skipped, val) -> mf.SamplesInfo:
    reasons = Counter(s.reason.split(":")[0] for s in skipped)
    return mf.SamplesInfo(
        conversations=len(loaded.conversations) + len(loaded.skipped),
        written=len(samples),
        train=len(samples) - len(val),
        val=len(val),
        skipped=len(skipped),
        skipped_by_reason=dict(sorted(reasons.items())),
        skipped_samples=[mf.SkippedSample(id=s.id, reason=s.reason) for s in skipped],
    )


# --- what training reads --------------------------------------------------------------------------------
def _manifest_shards(data_dir: Path, kind: str) -> list[Path]:
    return mf.read_manifest(data_dir).shard_paths(data_dir, kind)


def load_token_samples(data_dir: str | Path) -> tuple[list[TokenSample], list[TokenSample]]:
    """(train, val) TokenSamples of a finished data stage, in shard order."""
    data_dir = Path(data_dir)
    val = set(mf.read_manifest(data_dir).split.val_ids)
    samples = [s for p in _manifest_shards(data_dir, "tokens") for s in read_token_shard(p)]
    return [s for s in samples if s.sample_id not in val], [
        s for s in samples if s.sample_id in val
    ]


def feature_shards(data_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(train, val) feature shard paths (empty lists when data.features was off)."""
    data_dir = Path(data_dir)
    return _manifest_shards(data_dir, "features/train"), _manifest_shards(data_dir, "features/val")
