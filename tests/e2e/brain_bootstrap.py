#!/usr/bin/env python3
"""REST helpers for a throwaway z4j 1.13.0 brain (end-to-end tests only).

Stdlib only (urllib + http.cookiejar), so it runs under any Python 3.9+,
including a bare interpreter before the test venv exists.

What a freshly started brain needs before an agent can connect, when it was
started with Z4J_BOOTSTRAP_ADMIN_EMAIL / Z4J_BOOTSTRAP_ADMIN_PASSWORD:

  1. GET  /api/v1/health                    -> 200 once the app is up
  2. POST /api/v1/auth/login                -> z4j_session + z4j_csrf cookies
  3. project slug "default" exists (created by the admin bootstrap), or
     POST /api/v1/projects (global admin)
  4. POST /api/v1/projects/{slug}/agents    -> {agent, token, hmac_secret}
     (cookie session + X-CSRF-Token only; API keys are refused here)
  5. POST /api/v1/api-keys                  -> {"token": "z4k_..."} bearer
     for reads (and command issue) without cookies or CSRF.

As a script it provisions one agent (and an API key) and prints
shell-sourceable KEY=value lines:

  brain_bootstrap.py --url http://127.0.0.1:7711 --email a@example.com \
      --password '...' [--project default] [--agent-name NAME] [--no-api-key]
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, Tuple

#: Scopes of the API key the tests use for assertions.
READ_SCOPES = [
    "projects:read",
    "agents:read",
    "tasks:read",
    "workers:read",
    "queues:read",
    "commands:read",
    "commands:write",
]


class RestError(RuntimeError):
    """A REST call answered with an unexpected status."""


class Rest:
    """A tiny JSON client with a cookie jar (for the admin session)."""

    def __init__(self, base: str, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def csrf(self) -> Optional[str]:
        for cookie in self.jar:
            if cookie.name in ("z4j_csrf", "__Host-z4j_csrf"):
                return cookie.value
        return None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        bearer: Optional[str] = None,
        params: Optional[dict] = None,
    ) -> Tuple[int, Any]:
        """Return (status, decoded JSON or text). Never raises on HTTP errors."""
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if bearer:
            req.add_header("Authorization", f"Bearer {bearer}")
            opener = urllib.request.build_opener()  # no cookies with a bearer
        else:
            opener = self.opener
            if method not in ("GET", "HEAD") and self.csrf():
                req.add_header("X-CSRF-Token", self.csrf())
        try:
            with opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
                return resp.status, _decode(raw)
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())

    def expect(self, status: int, method: str, path: str, **kw: Any) -> Any:
        got, body = self.call(method, path, **kw)
        if got != status:
            raise RestError(f"{method} {path}: expected HTTP {status}, got {got}: {body}")
        return body


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def health_ok(base: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/api/v1/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def wait_healthy(base: str, timeout: float, alive=None) -> float:
    """Poll /api/v1/health; return seconds waited. `alive()` False aborts early."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if health_ok(base):
            return time.monotonic() - t0
        if alive is not None and not alive():
            raise RestError("brain process exited before becoming healthy")
        time.sleep(0.2)
    raise RestError(f"brain at {base} not healthy after {timeout:.0f}s")


def login(rest: Rest, email: str, password: str, attempts: int = 20) -> None:
    # The bootstrap admin is committed during startup, before /health answers;
    # retry anyway so a slow first boot does not fail the run.
    status, body = 0, None
    for _ in range(attempts):
        status, body = rest.call("POST", "/api/v1/auth/login", {"email": email, "password": password})
        if status == 200:
            return
        time.sleep(0.5)
    raise RestError(f"login failed: {status} {body}")


def ensure_project(rest: Rest, slug: str) -> dict:
    projects = rest.expect(200, "GET", "/api/v1/projects")
    project = next((p for p in projects if p["slug"] == slug), None)
    if project is None:
        project = rest.expect(201, "POST", "/api/v1/projects", body={"slug": slug, "name": slug})
    return project


def mint_agent(rest: Rest, slug: str, name: Optional[str] = None) -> dict:
    """Mint an agent token; returns {agent_id, name, token, hmac_secret, project_id}."""
    name = name or f"e2e-{secrets.token_hex(4)}"
    minted = rest.expect(201, "POST", f"/api/v1/projects/{slug}/agents", body={"name": name})
    return {
        "agent_id": minted["agent"]["id"],
        "name": minted["agent"]["name"],
        "project_id": minted["agent"].get("project_id"),
        "token": minted["token"],
        "hmac_secret": minted["hmac_secret"],
    }


def create_api_key(rest: Rest, scopes=None) -> str:
    key = rest.expect(
        201,
        "POST",
        "/api/v1/api-keys",
        body={"name": f"e2e-read-{secrets.token_hex(3)}", "scopes": list(scopes or READ_SCOPES)},
    )
    return key["token"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--email", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--project", default="default")
    ap.add_argument("--agent-name", default=None)
    ap.add_argument("--no-api-key", action="store_true")
    ap.add_argument("--wait", type=float, default=120.0)
    args = ap.parse_args()

    wait_healthy(args.url, args.wait)
    rest = Rest(args.url)
    login(rest, args.email, args.password)
    project = ensure_project(rest, args.project)
    agent = mint_agent(rest, project["slug"], args.agent_name)
    lines = {
        "Z4J_BRAIN_URL": args.url.rstrip("/"),
        "Z4J_TOKEN": agent["token"],
        "Z4J_HMAC_SECRET": agent["hmac_secret"],
        "Z4J_PROJECT_ID": project["slug"],
        "Z4J_PROJECT_UUID": project["id"],
        "Z4J_PROJECT_SLUG": project["slug"],
        "Z4J_AGENT_ID": agent["agent_id"],
        "Z4J_AGENT_NAME": agent["name"],
    }
    if not args.no_api_key:
        lines["Z4J_API_KEY"] = create_api_key(rest)
    for k, v in lines.items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
