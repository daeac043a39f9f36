"""The TTT training loop: AdamW + warmup/cosine, gradient accumulation and clipping, validation with
best-checkpoint selection, exact resume, and DDP / FSDP2 under torchrun.

Outputs in the run dir: `draft/` (the portable checkpoint of the best validation step),
`train_state/` (what resuming needs) and `train_metrics.json`. Metrics leave through a plain
callback(step, {name: value}) so that flows can forward them to MLflow.

One file over 400 lines because the loop, validation, best-checkpoint choice and resume share the
run's state; the unroll and loss are ttt.py, state files state.py, torchrun dist.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eagle3.config import ConfigError, Recipe
from eagle3.io import write_json_atomic
from eagle3.train import dist as D
from eagle3.train.batching import Loader, batch_index, epoch_order
from eagle3.train.dataset import Concat, ShardDataset, as_dataset
from eagle3.train.inputs import FeatureSource
from eagle3.train.optim import make_optimizer
from eagle3.train.state import (
    fingerprint_mismatch,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from eagle3.train.ttt import TTT, summarize

if TYPE_CHECKING:
    from eagle3.data.manifest import DataManifest

log = logging.getLogger(__name__)

DRAFT_DIR = "draft"
STATE_DIR = "train_state"
METRICS_FILE = "train_metrics.json"
STAT_METRICS = ("loss", "acc", "accept")
Callback = Callable[[int, dict[str, float]], None]


class DataMissing(FileNotFoundError):
    """The data stage has not run (or not finished) for this run dir."""


# --- entry point ---------------------------------------------------------------------------------
def run_training(recipe: Recipe, progress: bool = True, callback: Callback | None = None) -> dict:
    """Train on the data stage's output in `<run_dir>/data`, plus the training samples of the mixed
    stages (data.mix, train.mix_data); see train() for the summary."""
    from eagle3.data.manifest import DataManifest
    from eagle3.data.stages import combined_digest, mixed_dirs

    data_dir = recipe.run_path / "data"
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataMissing(
            f"{manifest_path} does not exist: run `eagle3 data --config <recipe>` first"
        )
    manifest = DataManifest.model_validate_json(manifest_path.read_text())
    from eagle3.data.reader import feature_shards, load_token_samples
    from eagle3.data.vocab import load_vocab

    vocab = load_vocab(data_dir)
    offline = recipe.train.features == "offline"
    if offline:
        train_shards, val_shards = feature_shards(data_dir)
        if not train_shards:
            raise ConfigError(
                f"train.features is offline but {data_dir} holds no feature shards "
                "(set data.features=true and rerun `eagle3 data`)"
            )
        train_set, val_set = ShardDataset(train_shards), ShardDataset(val_shards)
    else:
        train_set, val_set = load_token_samples(data_dir)
    digest = manifest.digest or ""
    dirs = mixed_dirs(recipe)
    if dirs:
        held_out = {conversation_id(i) for i in as_dataset(val_set).sample_ids}
        extra, digests = mixed_samples(dirs, manifest, held_out, features=offline)
        train_set = Concat([train_set, *extra]) if offline else train_set + extra
        digest = combined_digest(digest, digests)
    return train(
        recipe,
        train_set,
        val_set,
        vocab,
        data_digest=digest,
        progress=progress,
        callback=callback,
    )


def conversation_id(sample_id: str) -> str:
    """`source:conv` of a sample id (a long conversation's later pieces add `#<message>`)."""
    return sample_id.split("#", 1)[0]


def mixed_samples(
    dirs: list, manifest: DataManifest | dict, held_out: set[str], features: bool = False
) -> tuple[list, list[str]]:
    """Training samples of other data stages, renamed `<dir>:<id>`, without this run's held-out
    conversations (their teacher-forced twins would leak into training). Returns (samples, or one
    ShardDataset per stage when `features`; digests). Each stage must share this run's target and
    chat template (and feature settings when `features`)."""
    from eagle3.data.manifest import DataManifest, read_manifest
    from eagle3.data.reader import feature_shards, load_token_samples

    manifest = DataManifest.model_validate(manifest)
    out, digests = [], []
    for d in dirs:
        d = str(d)
        try:
            other = read_manifest(d)  # also refuses a manifest edited by hand
        except FileNotFoundError as e:
            raise DataMissing(f"mixed data stage: {e}") from e
        keys = ["target", "chat_template_sha256"]
        if features:
            keys += ["aux_layer_ids"]
        for key in keys:
            if getattr(other, key) != getattr(manifest, key):
                raise ConfigError(f"mixed data stage {d}: its {key} differs from this run's data")
        if not features:
            train_part, _ = load_token_samples(d)
            out += [
                dataclasses.replace(s, sample_id=f"{d}:{s.sample_id}")
                for s in train_part
                if conversation_id(s.sample_id) not in held_out
            ]
        else:
            if not other.features.written:
                raise ConfigError(
                    f"train.features is offline but mixed data stage {d} holds no feature "
                    "shards (set data.features=true and rerun `eagle3 data`)"
                )
            if other.features.dtype != manifest.features.dtype:
                raise ConfigError(
                    f"mixed data stage {d}: its feature dtype differs from this run's"
                )
            shards, _ = feature_shards(d)
            out.append(
                ShardDataset(
                    shards, keep=lambda i: conversation_id(i) not in held_out, prefix=f"{d}:"
                )
            )
        digests.append(other.digest or "")
    return out, digests


def build_draft(recipe: Recipe, target, vocab):
    """The draft for this target and vocabulary, initialised from train.seed (or train.init_from)."""
    from eagle3.models.draft import DraftConfig, Eagle3Draft

    vd = len(vocab.d2t)
    if vd != recipe.data.draft_vocab_size and vd != min(
        recipe.data.draft_vocab_size, target.vocab_size
    ):
        log.warning(
            "draft vocab has %d tokens, data.draft_vocab_size says %d",
            vd,
            recipe.data.draft_vocab_size,
        )
    cfg = DraftConfig.from_target(target.config, vd, target.aux_layer_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        draft = Eagle3Draft(cfg)
    draft.set_vocab(vocab.d2t, vocab.t2d)
    if recipe.train.init_from:
        _init_from(draft, recipe.train.init_from)
    return draft


def _init_from(draft, path: str) -> None:
    from eagle3.models.checkpoint import load_draft

    src = load_draft(path)
    if not torch.equal(src.d2t, draft.d2t.cpu()):
        raise ConfigError(
            f"train.init_from {path}: its draft vocabulary differs from the data stage's"
        )
    missing, unexpected = draft.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "inv_freq"]:
        raise ConfigError(f"train.init_from {path}: tensors do not match ({missing} {unexpected})")


def autocast_enabled(setting: str, device: str, flags: set[str] | None = None) -> bool:
    """train.autocast resolved: auto means on CUDA, and on a CPU with bf16 hardware."""
    if setting in ("on", "off"):
        return setting == "on"
    if device.startswith("cuda"):
        return True
    from eagle3.env import cpu_has_bf16

    return cpu_has_bf16(flags)


def _has_features(dataset) -> bool:
    return len(dataset) > 0 and getattr(dataset[0], "aux", None) is not None


# --- the loop -----------------------------------------------------------------------------------------
def train(
    recipe: Recipe,
    train_data,
    val_data,
    vocab,
    *,
    run_dir: str | Path | None = None,
    data_digest: str = "",
    target=None,
    progress: bool = False,
    callback: Callback | None = None,
) -> dict:
    """TTT-train a draft on `train_data` (TokenSamples, FeatureSamples or a ShardDataset).

    Returns {"draft_dir", "metrics" (final validation + best), "best", "steps", "train_metrics",
    "resumed_from"}. Resumes from `<run_dir>/train_state` when it exists.
    """
    cfg = recipe.train
    run_dir = Path(run_dir or recipe.run_path)
    from eagle3.env import resolve_device

    device = resolve_device(recipe.target.device)
    info = D.setup(cfg.distributed, device)
    try:
        if device.startswith("cuda") and info.world > 1:
            device = f"cuda:{info.local_rank}"
            torch.cuda.set_device(device)
        if target is None:
            from eagle3.models.target import load_target

            target = load_target(
                recipe.target.model_copy(update={"device": device}), recipe.cache_path
            )
        return _Run(recipe, run_dir, target, info, data_digest, progress, callback).fit(
            as_dataset(train_data), as_dataset(val_data), vocab
        )
    finally:
        D.teardown(info)


class _Run:
    """One training run's state; methods are the loop's pieces."""

    def __init__(self, recipe, run_dir, target, info, data_digest, progress, callback):
        self.recipe, self.cfg = recipe, recipe.train
        self.run_dir, self.target, self.info = run_dir, target, info
        self.digest, self.progress, self.callback = data_digest, progress, callback
        self.device = str(target.device)
        self.state_dir = run_dir / STATE_DIR
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.timing = {"target": 0.0, "draft": 0.0, "optimizer": 0.0, "data": 0.0}
        self.autocast = autocast_enabled(recipe.train.autocast, self.device)

    # --- setup ---------------------------------------------------------------------------------
    def fit(self, train_set, val_set, vocab) -> dict:
        cfg, info = self.cfg, self.info
        self.loader = Loader(train_set, cfg.max_len, cfg.long_policy, cfg.batch_tokens, cfg.seed)
        self.val_loader = Loader(val_set, cfg.max_len, cfg.long_policy, cfg.batch_tokens, cfg.seed)
        per_step = info.world * cfg.grad_accum
        self.per_epoch = len(self.loader) // per_step
        if self.per_epoch == 0:
            raise ConfigError(
                f"train: {len(self.loader)} micro-batches from {len(train_set)} samples, fewer than "
                f"world size x train.grad_accum = {per_step}; lower train.batch_tokens or add data"
            )
        self.total = cfg.max_steps or cfg.epochs * self.per_epoch
        self._check_best_metric()

        self.draft = build_draft(self.recipe, self.target, vocab).to(self.device)
        self.ttt = TTT(
            self.draft, cfg.ttt_steps, cfg.step_weight, cfg.grad_checkpointing, cfg.loss_style
        )
        self.model = D.wrap(self.ttt, info, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt, self.sched = make_optimizer(
            self.params, cfg.lr, cfg.betas, cfg.weight_decay, self.total, cfg.warmup_ratio
        )
        feature_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.recipe.data.feature_dtype, torch.float32
        )
        self.source = FeatureSource(
            self.target,
            self.draft,
            cfg.features,
            self.state_dir / "feature_cache",
            feature_dtype,
            cfg.loss_style,
        )
        if cfg.features == "offline" and not _has_features(train_set):
            raise ConfigError(
                "train.features is offline but the training samples carry no features"
            )
        # Validation reads features when its samples carry them, else runs the target (hybrid too).
        # It always counts rows the eagle3 way (the answer tokens a head must predict), so that
        # runs with different train.loss_style are compared on the same held-out metric.
        self.val_source = FeatureSource(
            self.target, self.draft, "offline" if _has_features(val_set) else "online"
        )
        self.fingerprint = self._fingerprint(vocab, len(train_set))
        start = self._resume()
        self._loop(start)
        return self._finish(start)

    def _fingerprint(self, vocab, n_train: int) -> dict[str, Any]:
        """What must not change between a saved state and a resumed run."""
        keys = ("features", "ttt_steps", "step_weight", "batch_tokens", "grad_accum", "lr", "betas",
                "weight_decay", "warmup_ratio", "grad_clip", "max_len", "long_policy", "seed",
                "epochs", "max_steps", "init_from")  # fmt: skip
        fp = {f"train.{k}": getattr(self.cfg, k) for k in keys}
        fp["train.betas"] = list(self.cfg.betas)
        # Keys added later enter only when they change what older runs did, so that a state saved
        # before they existed still resumes.
        if self.cfg.loss_style != "eagle3":
            fp["train.loss_style"] = self.cfg.loss_style
        if self.autocast != self.device.startswith("cuda"):
            fp["train.autocast"] = self.autocast
        fp["data digest"] = self.digest
        fp["train samples"] = n_train
        fp["world size"] = self.info.world
        fp["draft vocab sha256"] = hashlib.sha256(vocab.d2t.numpy().tobytes()).hexdigest()[:16]
        return fp

    def _check_best_metric(self) -> None:
        names = {f"val/{m}_{i}" for m in STAT_METRICS for i in range(self.cfg.ttt_steps)}
        names |= {"val/loss", "val/tau"}
        if self.cfg.best_metric not in names:
            raise ConfigError(
                f"train.best_metric {self.cfg.best_metric!r} is not a validation metric; use one of "
                f"val/loss, val/tau, val/loss_<i>, val/acc_<i>, val/accept_<i> (i < {self.cfg.ttt_steps})"
            )

    def _resume(self) -> int:
        state = load_state(self.state_dir)
        if state is None:
            return 0
        diff = fingerprint_mismatch(state["fingerprint"], self.fingerprint)
        if diff:
            raise ConfigError(
                f"{self.state_dir}: cannot resume, the run changed ({'; '.join(diff)}); "
                "delete that directory to start over"
            )
        D.load_full_state(self.model, self.opt, state["model"], state["optimizer"], self.info)
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.best, self.history = state["best"], state["history"]
        if self.info.main:
            log.info("resuming from step %d of %d (%s)", state["step"], self.total, self.state_dir)
        return int(state["step"])

    # --- steps ---------------------------------------------------------------------------------
    def _loop(self, start: int) -> None:
        cfg, info = self.cfg, self.info
        accum = cfg.grad_accum
        stats = torch.zeros(cfg.ttt_steps, 4)
        tokens, t_log = 0, time.perf_counter()
        bar = None
        if self.progress and info.main and start < self.total:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total, initial=start, desc="train", unit="step", dynamic_ncols=True
            )
        orders: dict[int, list[int]] = {}
        for step in range(start, self.total):
            epoch, s_in = divmod(step, self.per_epoch)
            if epoch not in orders:
                orders = {epoch: epoch_order(len(self.loader), epoch, cfg.seed)}
            self.model.train()
            for a in range(accum):
                t0 = time.perf_counter()
                bid = batch_index(orders[epoch], s_in, a, info.rank, info.world, accum)
                batch = self.loader.get(bid)
                t1 = time.perf_counter()
                before = self.source.target_seconds
                inputs = self.source(batch, bid, epoch)
                t2 = time.perf_counter()
                with D.no_sync(self.model, a < accum - 1):
                    with self._autocast():
                        loss, st = self.model(*inputs.args())
                    (loss / accum).backward()
                t3 = time.perf_counter()
                self.timing["data"] += t1 - t0
                self.timing["target"] += self.source.target_seconds - before
                self.timing["draft"] += t3 - t2
                stats += st.detach().float().cpu()
                tokens += batch.tokens
            t0 = time.perf_counter()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            lr = self.sched.get_last_lr()[0]
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.timing["optimizer"] += time.perf_counter() - t0
            done = step + 1
            last = done == self.total
            if done % cfg.log_every == 0 or last:
                sums = D.all_sum(torch.cat((stats.flatten(), torch.tensor([float(tokens)]))), info)
                elapsed = time.perf_counter() - t_log
                m = summarize(sums[:-1].view_as(stats), "train", cfg.step_weight)
                m["train/lr"] = lr
                m["train/grad_norm"] = float(
                    grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                )
                m["train/tokens_per_s"] = float(sums[-1]) / max(elapsed, 1e-9)
                m["train/epoch"] = done / self.per_epoch
                self._emit(done, m)
                if bar is not None:
                    bar.set_postfix(loss=f"{m['train/loss']:.3f}", acc0=f"{m['train/acc_0']:.3f}",
                                    tok_s=f"{m['train/tokens_per_s']:.0f}")  # fmt: skip
                stats.zero_()
                tokens, t_log = 0, time.perf_counter()
            if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                self._validate(done)
            if (cfg.save_every and done % cfg.save_every == 0) or last:
                self._save(done)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def _autocast(self):
        """bf16 autocast (fp32 master weights) where train.autocast resolves on, else plain fp32."""
        if self.autocast:
            kind = "cuda" if self.device.startswith("cuda") else "cpu"
            return torch.autocast(kind, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _emit(self, step: int, metrics: dict[str, float]) -> None:
        if not self.info.main:
            return
        self.history.append({"step": step, **metrics})
        if self.callback is not None:
            self.callback(step, dict(metrics))

    @torch.no_grad()
    def _validate(self, step: int) -> dict[str, float] | None:
        info, n = self.info, len(self.val_loader)
        if n == 0:
            return None
        inner = getattr(self.model, "module", self.model)
        inner.eval()
        sums = torch.zeros(self.cfg.ttt_steps, 4)
        style, inner.loss_style = inner.loss_style, "eagle3"  # see val_source
        try:
            # Every rank runs the same number of forwards (FSDP2 all-gathers in each); extras
            # are discarded.
            for r in range(math.ceil(n / info.world)):
                bid = r * info.world + info.rank
                inputs = self.val_source(self.val_loader.get(bid % n), bid % n, 0)
                with self._autocast():
                    _, st = inner(*inputs.args())
                if bid < n:
                    sums += st.float().cpu()
        finally:
            inner.loss_style = style
        sums = D.all_sum(sums, info)
        m = summarize(sums, "val", self.cfg.step_weight)
        self._emit(step, m)
        value = m[self.cfg.best_metric]
        lower = "loss" in self.cfg.best_metric
        if self.best is None or (
            value < self.best["value"] if lower else value > self.best["value"]
        ):
            self.best = {"metric": self.cfg.best_metric, "value": value, "step": step, "metrics": m}
            self._export(step)
        inner.train()
        return m

    # --- outputs -------------------------------------------------------------------------------
    def _full_draft(self):
        """A complete copy of the draft's weights on rank 0 (collective under FSDP2)."""
        if self.info.mode != "fsdp" or self.info.world <= 1:
            return self.draft
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from eagle3.models.draft import Eagle3Draft

        sd = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.info.main:
            return None
        out = Eagle3Draft(self.draft.config)
        out.load_state_dict({k.removeprefix("draft."): v for k, v in sd.items()}, strict=False)
        return out

    def _export(self, step: int, out_dir: Path | None = None) -> None:
        """The portable checkpoint of the current weights: `draft/` (best) or `out_dir`."""
        from eagle3.models.checkpoint import save_draft

        draft = self._full_draft()
        if not self.info.main:
            return
        infer = self.recipe.infer
        extra = {
            "tree": {
                "mode": infer.mode,
                "total_tokens": infer.total_tokens,
                "depth": infer.depth,
                "top_k": infer.top_k,
            },  # fmt: skip
            "data_digest": self.digest,
            "recipe": self.recipe.name,
            "profile": self.recipe.profile,
            "target": self.target.name,
            "target_revision": self.target.revision,
            "target_dtype": self.recipe.target.dtype,  # the export's default dtype
            "train": {
                "step": step,
                "ttt_steps": self.cfg.ttt_steps,
                "best_metric": self.cfg.best_metric,
                "best_value": self.best["value"] if self.best else None,
            },  # fmt: skip
        }
        save_draft(draft, out_dir or self.run_dir / DRAFT_DIR, extra=extra)

    def _save(self, step: int) -> None:
        if len(self.val_loader) == 0:
            # No held-out data: the best checkpoint is the latest one.
            self.best = {"metric": None, "value": None, "step": step, "metrics": {}}
            self._export(step)
        # The latest weights in the portable format too (`draft/` holds the best ones).
        self._export(step, self.state_dir / "last")
        model_sd, optim_sd = D.full_state(self.model, self.opt, self.info)
        if self.info.main:
            state = {
                "step": step,
                "model": model_sd,
                "optimizer": optim_sd,
                "scheduler": self.sched.state_dict(),
                "rng": rng_state(),
                "best": self.best,
                "history": self.history,
                "fingerprint": self.fingerprint,
            }
            save_state(self.state_dir, state)
            self._write_metrics(step)
        D.barrier(self.info)

    def _write_metrics(self, step: int) -> Path:
        path = self.run_dir / METRICS_FILE
        busy = sum(self.timing.values())
        val = [h for h in self.history if any(k.startswith("val/") for k in h)]
        trn = [h for h in self.history if "train/loss" in h]
        doc = {
            "step": step,
            "total_steps": self.total,
            "steps_per_epoch": self.per_epoch,
            "world_size": self.info.world,
            "features": self.cfg.features,
            "loss_style": self.cfg.loss_style,
            "autocast": self.autocast,
            "settings": self.cfg.model_dump(mode="json"),  # the recipe's train section
            "data": {
                "train": self.loader.stats,
                "val": self.val_loader.stats,
                "digest": self.digest,
            },
            "final": {**(trn[-1] if trn else {}), **(val[-1] if val else {})},
            "best": self.best,
            "timing_s": dict(self.timing),
            "time_share": {k: v / busy for k, v in self.timing.items()} if busy else {},
            "history": self.history,
        }
        return write_json_atomic(path, doc, indent=1)

    def _finish(self, start: int) -> dict:
        draft_dir = self.run_dir / DRAFT_DIR
        if self.info.main and not (draft_dir / "config.json").is_file():
            # A finished run whose export was removed: write the final weights.
            log.warning("%s is missing; exporting the final weights", draft_dir)
            self._export(self.total)
        D.barrier(self.info)
        val = [h for h in self.history if "val/loss" in h]
        metrics = {k: v for k, v in (val[-1] if val else {}).items() if k != "step"}
        if self.best and self.best.get("metric"):
            metrics[f"best/{self.best['metric']}"] = self.best["value"]
        return {
            "draft_dir": str(draft_dir),
            "metrics": metrics,
            "best": self.best,
            "steps": self.total,
            "resumed_from": start,
            "train_metrics": str(self.run_dir / METRICS_FILE),
            "data": {"train": self.loader.stats, "val": self.val_loader.stats},
        }
