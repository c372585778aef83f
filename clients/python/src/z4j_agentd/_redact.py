"""Redaction of secrets in what the engine integrations send.

Task arguments, results, exception messages and tracebacks leave the
application's process for the daemon's spool on disk and then the brain.
Before they do, every integration passes them through here:

* `scrub(value)`: a JSON-safe copy of `value` in which the value under any
  dict key that looks secret is replaced by `REDACTED` (the key names z4j's
  agents and brain treat as secret by default: `password`, `passwd`,
  `secret`, `token`, `api_key`, `authorization`, `cookie`, `credentials`,
  `cvv`, ... matched as whole keys, case-insensitive; `accessToken` and
  `access_token` both match, `last_password_reset` does not), and every
  string has its secret-looking parts replaced (see `scrub_text`).
* `scrub_text(text)`: the text with the parts that carry a secret whatever
  their key replaced: the password of a URL (`redis://user:pw@host` becomes
  `redis://user:[REDACTED]@host`), a bearer token, a JSON web token, the
  start of a PEM private key, and the well-known API-key shapes (Stripe,
  Slack, GitHub, AWS, Google, SendGrid). The rest of the text stays, so a
  traceback keeps its use.
* `exception_message(exc)`, `cut_text(text)`, `exception_traceback(exc)`:
  an event's `exception_message` and `traceback`, scrubbed before they are
  cut to 4,096 characters (a traceback keeps its start and its end, where
  the error is), so a secret straddling the cut is never split out of the
  scrub's sight; only a bounded span of a huge text is scrubbed.
* `event_value(value, max_bytes)`: what an event's `args`, `kwargs` and
  `result` are: first cut to about `max_bytes` (a long string keeps its
  start, a long list or dict its first items, with a note of what was left
  out), so the work stays bounded however large the value (a 20 MB
  argument costs microseconds, not a second of the task's thread or event
  loop); then `scrub`; then cut to `max_bytes` as JSON
  (`_jsonsafe.bounded`).

More key names come from the environment: `Z4J_AGENTD_REDACT_KEYS`, names
separated by commas, matched whole and case-insensitive. The brain redacts
again on its side with its own configuration; this keeps the secrets off
the host's disk and the wire in the first place. Personal data patterns
(e-mail addresses and the like) are left to the brain's configuration.
"""

from __future__ import annotations

import os
import re
import traceback as _traceback
from typing import Any, FrozenSet, List, Optional

from ._jsonsafe import MAX_DEPTH, bounded, json_safe

#: What replaces a secret.
REDACTED = "[REDACTED]"

#: Key names whose values are secret (full match, case-insensitive).
KEY_PATTERNS = (
    r"password", r"password_confirmation", r"password_hash", r"passwd", r"pwd",
    r"old_password", r"new_password",
    r"secrets?", r"client_?secret", r"webhook_?secret", r"hmac_?secret",
    r"token", r"access_?token", r"refresh_?token", r"id_?token", r"api_?token",
    r"bearer_?token", r"session_?token",
    r"api_?key", r"x[-_]api[-_]key", r"private_?key",
    r"authorization", r"auth", r"credentials", r"cookie", r"set[-_]cookie",
    r"ssn", r"social_security(_number)?", r"credit_card(_number)?", r"card_number",
    r"cvv", r"cvc",
)
_KEY_RE = re.compile("|".join(f"(?:{p})" for p in KEY_PATTERNS), re.IGNORECASE)

#: A key longer than this is not matched against the patterns (kept as is).
MAX_KEY_CHARS = 256

# (pattern, replacement): the part of a string that is secret.
_TEXT_RULES = (
    # a URL's password: scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.\-]{1,20}://[^:/@\s]*:)([^@\s/]+)(@)", re.IGNORECASE),
     r"\1" + REDACTED + r"\3"),
    (re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]+"), REDACTED),
    (re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[^-]*(?:-----END (?:[A-Z]+ )?PRIVATE KEY-----)?"),
     REDACTED),
    (re.compile(r"\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}|\bwhsec_[A-Za-z0-9]{16,}"
                r"|\bxox[abp]-[0-9A-Za-z\-]{10,}|\bgh[pos]_[A-Za-z0-9]{36}|\bgithub_pat_[A-Za-z0-9_]{40,}"
                r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_\-]{35}"
                r"|\bSG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}"), REDACTED),
)
# Cheap pre-check: a string without any of these cannot match a rule.
_HINTS = ("://", "earer", "eyJ", "PRIVATE KEY", "_live_", "_test_", "whsec_", "xox", "gh", "AKIA",
          "ASIA", "AIza", "SG.")


def _extra_keys() -> FrozenSet[str]:
    raw = os.environ.get("Z4J_AGENTD_REDACT_KEYS", "")
    return frozenset(k.strip().lower() for k in raw.split(",") if k.strip())


def secret_key(key: Any, extra: FrozenSet[str] = frozenset()) -> bool:
    """Whether the value under `key` is redacted."""
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
        return False
    return bool(_KEY_RE.fullmatch(key)) or key.lower() in extra


def scrub_text(text: Any) -> Any:
    """`text` with its secret-looking parts replaced; anything else as is."""
    if not isinstance(text, str) or not any(h in text for h in _HINTS):
        return text
    for pattern, replacement in _TEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


def scrub(value: Any) -> Any:
    """A JSON-safe copy of `value` with secrets replaced (see the module)."""
    return _scrub(json_safe(value), _extra_keys())


def _scrub(value: Any, extra: FrozenSet[str]) -> Any:
    # json_safe already bounded the depth and made fresh dicts and lists.
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        for key in list(value):
            value[key] = REDACTED if secret_key(key, extra) else _scrub(value[key], extra)
        return value
    if isinstance(value, list):
        out: List[Any] = [_scrub(item, extra) for item in value]
        return out
    return value


#: Characters kept past a cut while scrubbing, so that a secret straddling
#: the cut is still recognised whole and replaced before the final cut.
_SCRUB_MARGIN = 512


def _prune(value: Any, budget: List[int], extra: FrozenSet[str], depth: int = 0) -> Any:
    """A copy of `value` holding about `budget[0]` characters at most: what
    is left out is named, never walked (the walk costs what is kept, not
    what was passed)."""
    if isinstance(value, str):
        if len(value) > budget[0] + _SCRUB_MARGIN:
            keep = max(budget[0], 0)
            value = scrub_text(value[:keep + _SCRUB_MARGIN])[:keep] + (
                f"... [cut by z4j-agentd-client: {len(value)} characters]")
        budget[0] -= len(value)
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[:budget[0] + _SCRUB_MARGIN + 1]) if budget[0] >= 0 else b""
        if len(raw) > budget[0] + _SCRUB_MARGIN:
            return _prune(raw.decode("utf-8", "replace"), budget, extra, depth)
        budget[0] -= len(raw)
        return value
    if depth >= MAX_DEPTH:
        budget[0] -= 16
        return value
    if isinstance(value, dict):
        out: Any = {}
        try:
            items = list(value.items())
        except Exception:
            return value
        for n, (key, item) in enumerate(items):
            if budget[0] <= 0:
                out["..."] = f"[{len(items) - n} more keys left out by z4j-agentd-client]"
                break
            budget[0] -= len(key) + 4 if isinstance(key, str) else 16
            # a secret is replaced here already: its size never counts
            out[key] = REDACTED if secret_key(key, extra) else _prune(item, budget, extra, depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        try:
            items = list(value)
        except Exception:
            return value
        kept: List[Any] = []
        for n, item in enumerate(items):
            if budget[0] <= 0:
                kept.append(f"[{len(items) - n} more items left out by z4j-agentd-client]")
                break
            budget[0] -= 2
            kept.append(_prune(item, budget, extra, depth + 1))
        return kept if not isinstance(value, (set, frozenset)) or len(kept) < len(items) else set(kept)
    budget[0] -= 16
    return value


def event_value(value: Any, max_bytes: int = 65536) -> Any:
    """What an event carries for `value` (args, kwargs, a result): cut to
    about `max_bytes` first (bounded work), scrubbed, then cut to
    `max_bytes` as JSON."""
    extra = _extra_keys()
    return bounded(_scrub(json_safe(_prune(value, [max_bytes + 1024], extra)), extra), max_bytes)


#: An exception message or traceback is cut to this many characters.
MAX_TEXT_CHARS = 4096
#: What marks the cut in a traceback.
CUT = "\n[... cut by z4j-agentd-client ...]\n"
#: Only this much of a text's start (and end) is scrubbed: far more than is
#: kept, so no secret split there reaches what is kept, and a huge text
#: costs no more than this.
_TEXT_SCRUB_SPAN = 4 * MAX_TEXT_CHARS


def exception_message(exc: Any, limit: int = MAX_TEXT_CHARS) -> Optional[str]:
    """`str(exc)` (its `repr()` when that fails), scrubbed, then cut to
    `limit` characters; None for None."""
    if exc is None:
        return None
    try:
        text = str(exc)
    except Exception:
        try:
            text = repr(exc)
        except Exception:
            text = f"<{type(exc).__name__}>"
    return scrub_text(text[:max(limit, _TEXT_SCRUB_SPAN)])[:limit]


def cut_text(text: Any, limit: int = MAX_TEXT_CHARS) -> Optional[str]:
    """A traceback (or any long text) scrubbed, then cut to `limit`
    characters keeping its start and its end; None for no text."""
    if not isinstance(text, str) or not text:
        return None
    span = max(limit, _TEXT_SCRUB_SPAN)
    if len(text) > 2 * span:
        text = text[:span] + CUT + text[-span:]
    text = scrub_text(text)
    if len(text) > limit:
        half = (limit - len(CUT)) // 2
        text = text[:half] + CUT + text[-half:]
    return text


def exception_traceback(exc: Any, fallback: Any = None, limit: int = MAX_TEXT_CHARS) -> Optional[str]:
    """The exception's formatted traceback through `cut_text`; `fallback`
    (a text) when it cannot be formatted."""
    try:
        text = "".join(_traceback.format_exception(type(exc), exc, getattr(exc, "__traceback__", None)))
    except Exception:
        text = fallback
    return cut_text(text, limit)
