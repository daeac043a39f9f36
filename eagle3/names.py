"""Slugs: the lower-case names MLflow models, S3 prefixes and Prefect artifact keys are built from."""

from __future__ import annotations

import re


def slugify(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "model"
