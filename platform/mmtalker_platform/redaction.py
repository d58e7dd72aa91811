"""Redaction: secrets never reach MLflow, job records or logs.

Specs carry credentials (``ray.runtime_env.env_vars``, database URIs); everything the platform
logs or stores passes through :func:`redact` (structures) or :func:`redact_text` (free text).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

#: What a secret value is replaced by.
REDACTED = "<redacted>"

# Names are matched after camelCase, dashes and dots become SNAKE_CASE, so ``secretKey``,
# ``x-api-key`` and ``AWS_SECRET_ACCESS_KEY`` all match.
_SECRET_WORDS = (
    r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_?KEY|CREDENTIAL|SESSION|API_?KEY|PRIVATE_?KEY"
    r"|AUTHORIZATION|SIGNATURE"
)
_SECRET_NAME = re.compile(_SECRET_WORDS)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# ``scheme://user:password@`` keeps the user; ``scheme://token@`` loses the whole user part.
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# ``NAME=value``, ``NAME: value``, ``"NAME": "value"`` where NAME is secret-like.
_ASSIGNMENT = re.compile(
    rf"(?P<name>[A-Za-z0-9_.-]*(?:{_SECRET_WORDS})[A-Za-z0-9_.-]*)"
    r"(?P<sep>['\"]?\s*[:=]\s*['\"]?)(?P<value>(?:Bearer\s+|Basic\s+)?[^\s'\",;&}\]]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(?P<scheme>Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+")


def is_secret_name(name: str) -> bool:
    """True for a key or variable name whose value is a credential (``AWS_SECRET_ACCESS_KEY``)."""
    snake = _CAMEL.sub("_", name).upper().replace("-", "_").replace(".", "_")
    return _SECRET_NAME.search(snake) is not None


def redact_text(text: str) -> str:
    """``text`` with URI passwords, bearer tokens and ``SECRET_NAME=value`` values redacted."""

    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        kept = f"{user}:{REDACTED}" if colon else REDACTED
        return f"{match['scheme']}{kept}@"

    def assignment(match: re.Match[str]) -> str:
        return f"{match['name']}{match['sep']}{REDACTED}"

    text = _URI_USERINFO.sub(userinfo, text)
    text = _ASSIGNMENT.sub(assignment, text)
    return _BEARER.sub(lambda m: f"{m['scheme']} {REDACTED}", text)


def redact(value: Any) -> Any:
    """A redacted deep copy: secret-named keys' values and credentials inside strings masked.

    Mappings, lists and tuples are copied; a pydantic model becomes its JSON-mode dict.
    """
    if isinstance(value, BaseModel):
        return redact(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {key: REDACTED if _masks(key, item) else redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def _masks(key: Any, value: Any) -> bool:
    # A flag or an unset value under a secret-like name discloses nothing and stays readable.
    return is_secret_name(str(key)) and value is not None and not isinstance(value, bool)
