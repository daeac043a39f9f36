"""The bench's per-prompt journal: a stopped `eagle3 bench` resumes where it stopped.

After every prompt the bench rewrites one JSON file (temp file + rename) holding each finished
prompt's tallies under a key of everything that decides them: the draft's weights, the target,
the engine and eval settings, the device and thread count, and the prompt itself. A rerun takes
the prompts it finds there and decodes only the rest. A journal written under other settings, or
by another commit of the code (a refactor can change the numbers), is set aside, never mixed in;
`eagle3 bench --resume-across-commits` keeps one from another commit when the settings match. Ratios stay honest across sessions because every decoder of a prompt
runs back to back in one process; only which prompts ran in which session differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eagle3.io import sha256_json, write_json_atomic

VERSION = 2  # 2: the code's commit is recorded beside the key


def _sha(obj: Any) -> str:
    return sha256_json(obj)


def weights_sha256(draft_dir: str | Path) -> str:
    from eagle3.io import sha256_file
    from eagle3.models.checkpoint import WEIGHTS_FILE

    return sha256_file(Path(draft_dir) / WEIGHTS_FILE)


def bench_key(weights: str, recipe, infer_cfg, device: str, threads: int) -> str:
    """What decides every prompt's numbers except the prompt: the draft's weights (their sha256;
    not its config, which an autotune rewrites), target, engine, eval settings, device and
    threads."""
    ev = recipe.eval
    return _sha(
        {
            "version": VERSION,
            "draft": weights,
            "target": recipe.target.model_dump(mode="json"),
            "infer": infer_cfg.model_dump(mode="json"),
            "eval": ev.model_dump(mode="json", exclude={"datasets", "limit", "warmup"}),
            "seed": recipe.seed,
            "device": device,
            "threads": threads,
        }
    )


def prompt_key(dataset: str, prompt_id: str, turns: list[str]) -> str:
    return _sha({"dataset": dataset, "id": prompt_id, "turns": turns})


class Journal:
    """{prompt key: record} for one bench key and code version (provenance.code_id: the git
    commit, or the installed package's version); `path` None keeps it in memory only."""

    def __init__(
        self,
        path: str | Path | None,
        key: str,
        commit: str | None = None,
        across_commits: bool = False,
    ):
        self.path = Path(path) if path is not None else None
        self.key, self.commit = key, commit
        self.records: dict[str, dict] = {}
        self.set_aside: Path | None = None
        self.why = ""
        if self.path is None or not self.path.is_file():
            return
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        same_code = doc.get("commit") == commit
        if doc.get("key") == key and (same_code or across_commits):
            self.records = dict(doc.get("prompts") or {})
        elif self.path.stat().st_size:
            # Other settings, another head or other code: keep it for the record, start anew.
            self.why = (
                "measured under other settings or another head"
                if doc.get("key") != key
                else f"measured by commit {doc.get('commit')}, this is {commit} "
                "(--resume-across-commits keeps it)"
            )
            self.set_aside = self.path.with_name(self.path.name + ".old")
            self.path.replace(self.set_aside)

    def get(self, pkey: str) -> dict | None:
        return self.records.get(pkey)

    def put(self, pkey: str, record: dict) -> None:
        self.records[pkey] = record
        if self.path is not None:
            doc = {"key": self.key, "commit": self.commit, "prompts": self.records}
            write_json_atomic(self.path, doc)


class BenchProgress:
    """`[i/n]` and the time left, from the prompts measured in this session."""

    def __init__(self, total: int):
        self.total, self.done, self.skipped, self.seconds, self.n = total, 0, 0, 0.0, 0

    def measured(self, seconds: float) -> None:
        self.done, self.n, self.seconds = self.done + 1, self.n + 1, self.seconds + seconds

    def resumed(self) -> None:
        self.done, self.skipped = self.done + 1, self.skipped + 1

    def line(self) -> str:
        out = f"[{self.done}/{self.total}"
        if self.skipped:
            out += f", {self.skipped} from the journal"
        left = self.total - self.done
        if self.n and left:
            out += f", ETA {_duration(self.seconds / self.n * left)}"
        return out + "]"


def _duration(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{max(m, 1)} min"
