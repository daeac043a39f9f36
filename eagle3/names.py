"""Names shown to people: slugs (MLflow models, S3 prefixes, Prefect artifact keys) and URLs with
the credentials they may carry hidden (logs, MLflow params, error messages)."""

from __future__ import annotations

import re


def slugify(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "model"


def redact(text: str, mask: str = "***") -> str:
    """Hide credentials embedded in URIs (scheme://user:secret@host -> scheme://***@host; with
    mask="" they are dropped: scheme://host)."""
    return re.sub(r"(://)[^/@\s]+@", r"\1" + (f"{mask}@" if mask else ""), text)
