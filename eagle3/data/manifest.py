"""The data manifest (docs/CONTRACTS.md §5; docs/schemas/data-manifest.schema.json) and its digest.

The digest is a sha256 over `digest_of`: what the training data IS, not how it was made or stored:
- the token samples (id, input ids, loss mask), hashed in sample-id order, and the train/val split;
- the draft vocabulary (d2t);
- when feature shards are written: the target (id, revision) and the feature settings that fix
  their values (aux layer ids, dtype).
Shard layout, batch size, concurrency, run directory, timings and paths are left out, so the
digest changes when and only when the data changes. Shard files keep their own sha256 in the
manifest for integrity checks.

The models allow extra keys: a manifest outlives the code that wrote it (a run directory, an
MLflow dataset), and a newer writer's additions must not stop an older trainer from reading it.
The file is written with sorted keys, so field order here is free.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from eagle3 import io
from eagle3.contract import Contract, first_error

MANIFEST = "manifest.json"
VERSION = 1


class TargetIdentity(Contract):
    id: str = Field(description="model id, path, or tiny-llama(seed=..)")
    revision: str | None = Field(description="revision, file sha256 or seeded:<config hash>")


class TargetInfo(TargetIdentity):
    kind: str = Field(description="tiny, embedded, gguf, hf, ...")


class SourceEntry(Contract):
    """One data source and what was read from it (resolved and counted by eagle3.data.sources)."""

    name: str
    path: str
    sha256: str | None = None
    package: str | None = None
    format: str = "auto"
    note: str | None = None
    read: int = Field(default=0, description="records read (good + bad)")
    kept: int = 0
    bad: int = 0
    truncated: bool = Field(default=False, description="the file ended mid-record")
    # name: traffic (eagle3/traffic/source.py): what was read, exactly, and how it was split.
    since: str | None = None
    until: str | None = None
    objects: list[dict[str, str]] | None = Field(
        default=None, description="traffic batches read: [{key, etag}]"
    )
    held_out: int | None = Field(default=None, description="newest records held out")
    answers_recorded: int | None = Field(default=None, description="recorded answers reused")
    answers_regenerated: int | None = None
    regenerated_because: dict[str, int] | None = None
    first_time: str | None = None
    last_time: str | None = None

    def written(self) -> SourceEntry:
        """The entry as the manifest holds it: every field that has a value, the zero counts
        included (a local file has no sha256, package or note)."""
        return SourceEntry.model_validate(self.model_dump(exclude_none=True))


class SkippedSample(Contract):
    id: str
    reason: str


class SamplesInfo(Contract):
    conversations: int
    written: int
    train: int
    val: int
    skipped: int
    skipped_by_reason: dict[str, int]
    skipped_samples: list[SkippedSample]

    @classmethod
    def of(cls, conversations: int, samples, skipped, val: set[str]) -> SamplesInfo:
        """`conversations` read (kept + skipped), the TokenSamples written, the Skips, val ids."""
        reasons = Counter(s.reason.split(":")[0] for s in skipped)
        return cls(
            conversations=conversations,
            written=len(samples),
            train=len(samples) - len(val),
            val=len(val),
            skipped=len(skipped),
            skipped_by_reason=dict(sorted(reasons.items())),
            skipped_samples=[SkippedSample(id=s.id, reason=s.reason) for s in skipped],
        )


class TokensInfo(Contract):
    total: int
    trainable: int = Field(description="tokens under the loss mask")

    @classmethod
    def of(cls, samples) -> TokensInfo:
        return cls(
            total=int(sum(len(s) for s in samples)),
            trainable=int(sum(int(s.loss_mask.sum()) for s in samples)),
        )


class RegenerationInfo(Contract):
    """The regeneration settings and its counts (eagle3.data.regenerate.RegenStats)."""

    enabled: bool
    backend: str
    temperature: float
    max_new_tokens: int
    seed: int
    turns: int = 0
    new_tokens: int = 0
    hit_max_new_tokens: int = 0
    turns_cut: int = 0
    errors: int = 0

    @classmethod
    def of(cls, data, stats) -> RegenerationInfo:
        """`data`: the recipe's data section; `stats`: the summed RegenStats (its time is in
        `timing`)."""
        return cls(
            enabled=data.regenerate,
            backend=data.backend,
            temperature=data.temperature,
            max_new_tokens=data.max_new_tokens,
            seed=data.seed,
            **{k: v for k, v in stats.as_dict().items() if k != "seconds"},
        )


class VocabInfo(Contract):
    file: str
    size: int
    coverage: float = Field(description="share of trainable tokens the draft vocabulary covers")
    seen: int
    padded: int

    @classmethod
    def of(cls, vocab, file: str) -> VocabInfo:
        """`vocab`: the DraftVocab written to `file` (relative to the data folder)."""
        return cls(
            file=file,
            size=int(len(vocab.d2t)),
            coverage=vocab.coverage,
            seen=vocab.seen,
            padded=vocab.padded,
        )


class FeaturesInfo(Contract):
    written: bool
    dtype: str | None = None
    bytes_per_token: int | None = None
    estimated_bytes: int | None = None
    max_disk_gb: float | None = None


class Shard(Contract):
    kind: str = Field(description="tokens, features/train or features/val")
    path: str = Field(description="relative to the data folder")
    rows: int
    sha256: str

    @classmethod
    def of(cls, kind: str, path: Path, data_dir: Path, rows: int) -> Shard:
        return cls(
            kind=kind, path=str(path.relative_to(data_dir)), rows=rows, sha256=io.sha256_file(path)
        )


class Split(Contract):
    val_fraction: float
    val_ids: list[str]


class Timing(Contract):
    seconds: float
    regen_seconds: float
    finished_at: str


class FeatureIdentity(Contract):
    target: TargetIdentity
    aux_layer_ids: list[int]
    dtype: str


class DigestOf(Contract):
    """What the data IS; `digest` is the sha256 of its canonical JSON."""

    samples_sha256: str
    val_ids: list[str]
    vocab_d2t_sha256: str
    features: FeatureIdentity | None = Field(description="null when no feature shards")

    @classmethod
    def of(cls, samples, val: set[str], vocab, features: FeatureIdentity | None) -> DigestOf:
        return cls(
            samples_sha256=samples_sha256(samples),
            val_ids=sorted(val),
            vocab_d2t_sha256=tensor_sha256(vocab.d2t),
            features=features,
        )


class DataManifest(Contract):
    """`<data dir>/manifest.json`, written last by the data stage."""

    version: int
    recipe: str
    target: TargetInfo
    aux_layer_ids: list[int]
    chat_template_sha256: str | None
    sources: list[SourceEntry]
    samples: SamplesInfo
    tokens: TokensInfo
    regeneration: RegenerationInfo
    vocab: VocabInfo
    features: FeaturesInfo
    shards: list[Shard]
    split: Split
    timing: Timing
    digest_of: DigestOf
    digest: str | None = Field(default=None, description="sha256 over digest_of; set on write")

    def shard_paths(self, data_dir: str | Path, kind: str) -> list[Path]:
        return [Path(data_dir) / s.path for s in self.shards if s.kind == kind]


def samples_sha256(samples) -> str:
    """Order-independent content hash of TokenSamples (sorted by sample id)."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.sample_id):
        h.update(s.sample_id.encode())
        h.update(b"\0")
        h.update(s.input_ids.long().contiguous().numpy().tobytes())
        h.update(s.loss_mask.bool().contiguous().numpy().tobytes())
    return h.hexdigest()


def tensor_sha256(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def compute_digest(digest_of: dict[str, Any]) -> str:
    return io.sha256_json(digest_of, compact=True)


def finish(manifest: DataManifest) -> DataManifest:
    """Set `digest` from `digest_of`."""
    manifest.digest = compute_digest(manifest.digest_of.to_dict())
    return manifest


def write_json_atomic(path: str | Path, obj: Any) -> None:
    io.write_json_atomic(path, obj, sort_keys=True)


def write_manifest(data_dir: str | Path, manifest: DataManifest) -> Path:
    path = Path(data_dir) / MANIFEST
    write_json_atomic(path, finish(manifest).to_dict())
    return path


def read_manifest(data_dir: str | Path) -> DataManifest:
    """The manifest of a finished data stage; refuses one whose digest does not match its content
    or that is not a manifest (naming the file and the first bad key)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `eagle3 data` first")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("digest") != compute_digest(raw.get("digest_of", {})):
        raise ValueError(f"{path}: digest does not match its content (edited by hand?)")
    try:
        return DataManifest.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{path}: not a data manifest: {first_error(e)}") from e
