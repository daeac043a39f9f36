"""Names shown to people: slugs (MLflow models, S3 prefixes, Prefect artifact keys), and the one
redaction applied to what leaves the process (version manifests, MLflow params and tags, logs,
error messages): credentials in URLs, secret-shaped query parameters and tokens, and the values of
keys that name a secret (`redact`, `redact_value`, `is_secret_key`)."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# Words of a key (split at ., _, -, and camelCase) that make its value a secret ...
_SECRET_WORDS = {
    "secret",
    "secrets",
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "token",
    "credential",
    "credentials",
    "apikey",
    "auth",
    "authorization",
    "cookie",
    "signature",
    "privatekey",
    "accesskey",
    "secretkey",
}
# ... and pairs of adjacent words that do (api_key, aws_access_key_id, private-key, ...).
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("key", "id"), ("private", "key")}
# Query parameters of a URL whose value is a secret (?api_key=..., &X-Amz-Signature=...).
_SECRET_QUERY = re.compile(
    r"(?i)([?&;][^=&;#\s]*(?:token|secret|password|passwd|key|signature|credential|auth)"
    r"[^=&;#\s]*=)[^&;#\s]+"
)
# Values shaped like keys whatever their name: AWS access key ids, sk-/api_/token_ keys (with a
# digit, so that names like `token_classification_set` stay).
_SECRET_SHAPES = re.compile(
    r"\b(?:(?:AKIA|ASIA)[A-Z0-9]{16}|(?:sk|pk|api|key|token)[-_](?=[A-Za-z_-]*\d)[A-Za-z0-9_-]{16,})\b"
)


def slugify(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "model"


def redact(text: str, mask: str = MASK) -> str:
    """Hide credentials embedded in URIs (scheme://user:secret@host -> scheme://***@host; with
    mask="" they are dropped: scheme://host), the values of secret-named query parameters
    (?api_key=***) and key-shaped tokens (AKIA..., sk-...)."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1" + (f"{mask}@" if mask else ""), text)
    text = _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, text)
    return _SECRET_SHAPES.sub(MASK, text)


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a key (a dotted recipe key, a param, a tag, an env name) names a secret: any word
    in _SECRET_WORDS or adjacent pair in _SECRET_PAIRS (`max_new_tokens` does not: `tokens`)."""
    words = _words(str(key))
    return any(w in _SECRET_WORDS for w in words) or any(
        pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False)
    )


def redact_value(value: Any, key: str = "") -> Any:
    """`value` as it may leave the process: the whole value masked when `key` names a secret,
    else strings through `redact` and mappings and lists walked (their keys checked too)."""
    if key and is_secret_key(key) and value not in (None, "", [], {}):
        return MASK
    if isinstance(value, dict):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def redact_mapping(mapping: dict[str, Any]) -> dict[str, Any]:
    """Every value of a flat or nested mapping through `redact_value` under its key."""
    return {k: redact_value(v, str(k)) for k, v in mapping.items()}
