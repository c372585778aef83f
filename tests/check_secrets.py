#!/usr/bin/env python3
"""No token or HMAC secret in any log output of the test suite.

    tests/check_secrets.py [LOG_DIR] [--require SOURCE ...]
    tests/check_secrets.py --self-test

LOG_DIR (default: $Z4J_TEST_LOG_DIR) is the directory tests/run-all.sh
creates and exports as Z4J_TEST_LOG_DIR. Its layout:

  <source>.secrets   the credentials a test source handed out, one per
                     line: `label<TAB>value` (a bare `value` is labelled by
                     its file and line); blank lines and `#` lines are
                     skipped. rust.secrets (tests/it/support), e2e.secrets
                     (tests/e2e/conftest.py), packaging.secrets (deb.sh).
  <source>/...       that source's logs: rust/ (in-process daemons at
                     TRACE, the binary tests' processes), e2e/ (daemon,
                     brain, client, worker and CLI logs of the session),
                     packaging/ (the installed daemon's doctor).
  steps/             every run-all.sh step's console output.

Every file other than the top-level *.secrets files, at any depth, is
read as bytes (decoded as UTF-8 with errors replaced) and searched for
every secret of every source. Fails (exit 1) when:

  * a secret occurs in a file: the file, the line and the secret's label
    are printed, never its value;
  * a secret is shorter than 16 characters (too weak to search for: it
    would match by chance, and a check that can only pass proves nothing);
  * a source has logs but no secrets, or secrets but no logs (`steps` has
    no secrets of its own), or a --require'd source has neither;
  * no secret or no log byte was read at all.

--self-test plants secrets into temporary log directories and checks that
each rule above fails and that a clean directory passes. Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

MIN_SECRET_LEN = 16
TOP_LEVEL = "(top level)"
# Sources whose logs are checked against the other sources' secrets only.
NO_OWN_SECRETS = {"steps", TOP_LEVEL}


def read_secrets(log_dir: Path, errors: List[str]) -> Dict[str, List[Tuple[str, str]]]:
    """{source: [(label, value)]} from the top-level *.secrets files."""
    out: Dict[str, List[Tuple[str, str]]] = {}
    for path in sorted(log_dir.glob("*.secrets")):
        if not path.is_file():
            continue
        source = path.name[: -len(".secrets")]
        entries = out.setdefault(source, [])
        text = path.read_bytes().decode("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            line = line.rstrip("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            label, sep, value = line.partition("\t")
            if not sep:
                label, value = f"{path.name} line {n}", line
            value = value.strip()
            label = f"{source}: {label.strip() or f'line {n}'}"
            if len(value) < MIN_SECRET_LEN:
                errors.append(
                    f"{path.name} line {n} ({label}): a secret of {len(value)} characters is too weak "
                    f"to search for (at least {MIN_SECRET_LEN}); give the test a longer one"
                )
                continue
            entries.append((label, value))
    return out


def log_files(log_dir: Path) -> List[Path]:
    files = []
    for root, dirs, names in os.walk(log_dir, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            if Path(root) == log_dir and name.endswith(".secrets"):
                continue
            if p.is_file():
                files.append(p)
    return files


def source_of(log_dir: Path, path: Path) -> str:
    rel = path.relative_to(log_dir)
    return rel.parts[0] if len(rel.parts) > 1 else TOP_LEVEL


def check(log_dir: Path, require: List[str] = ()) -> int:
    """Prints what it read and every problem; returns the exit status."""
    errors: List[str] = []
    if not log_dir.is_dir():
        print(f"check_secrets: {log_dir} is not a directory", file=sys.stderr)
        return 1
    secrets = read_secrets(log_dir, errors)

    # Each distinct value once, with every label it has.
    labels: Dict[str, List[str]] = {}
    for entries in secrets.values():
        for label, value in entries:
            if label not in labels.setdefault(value, []):
                labels[value].append(label)

    files = log_files(log_dir)
    per_source: Dict[str, List[int]] = {}
    for path in files:
        data = path.read_bytes()
        stats = per_source.setdefault(source_of(log_dir, path), [0, 0])
        stats[0] += 1
        stats[1] += len(data)
        text = data.decode("utf-8", errors="replace")
        for value, names in labels.items():
            at = text.find(value)
            if at >= 0:
                line = text.count("\n", 0, at) + 1
                hits = text.count(value)
                errors.append(
                    f"LEAK {path.relative_to(log_dir)} line {line}"
                    f"{f' (and {hits - 1} more)' if hits > 1 else ''}: {' = '.join(names)}"
                )

    for source in sorted(set(per_source) | set(secrets) | set(require)):
        n_files, n_bytes = per_source.get(source, [0, 0])
        n_secrets = len({value for _, value in secrets.get(source, [])})
        has_file = (log_dir / f"{source}.secrets").is_file()
        print(f"check_secrets: {source}: {n_files} log files, {n_bytes} bytes; {n_secrets} distinct secrets")
        if source in NO_OWN_SECRETS:
            if source in require and n_bytes == 0:
                errors.append(f"{source}: required, but no log bytes were read")
            continue
        if n_bytes and not n_secrets and not has_file:
            errors.append(f"{source}: logs but no {source}.secrets: nothing to search them for")
        elif n_bytes and not n_secrets:
            errors.append(f"{source}: {source}.secrets lists no usable secret")
        if has_file and not n_bytes:
            errors.append(f"{source}: {source}.secrets but no log bytes under {source}/: the check read nothing")
        if source in require and not has_file and not n_bytes:
            errors.append(f"{source}: required, but it left neither logs nor secrets")
    total_bytes = sum(b for _, b in per_source.values())
    print(f"check_secrets: {len(files)} files, {total_bytes} bytes searched for {len(labels)} distinct secrets")
    if not labels:
        errors.append("no secrets read: the check would pass whatever the logs say")
    if total_bytes == 0:
        errors.append("no log bytes read: the check read nothing")
    for e in errors:
        print(f"check_secrets: FAIL {e}", file=sys.stderr)
    if errors:
        print(f"check_secrets: {len(errors)} problems in {log_dir}", file=sys.stderr)
        return 1
    print(f"check_secrets: OK, no secret in any log under {log_dir}")
    return 0


# ---------------------------------------------------------------- self-test


def self_test() -> int:
    token = "self-test-token-0123456789"
    secret = "c2VsZi10ZXN0LXNlY3JldC1zZWxmLXRlc3Qtc2VjcmV0"

    def run(setup, require=()) -> Tuple[int, str]:
        with tempfile.TemporaryDirectory(prefix="check-secrets-") as d:
            root = Path(d)
            setup(root)
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                status = check(root, list(require))
            return status, out.getvalue()

    def write(root: Path, rel: str, text: str) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def clean(root: Path) -> None:
        write(root, "rust.secrets", f"token\t{token}\n# a comment\n\n{secret}\n")
        write(root, "rust/daemon.log", "INFO connected to the brain\n")
        write(root, "steps/1-cargo-test.log", "test result: ok\n")

    failures = []

    def expect(name: str, setup, want: int, must_say=(), require=()) -> None:
        status, out = run(setup, require)
        if status != want:
            failures.append(f"{name}: exit {status}, wanted {want}:\n{out}")
        for s in must_say:
            if s not in out:
                failures.append(f"{name}: output does not say {s!r}:\n{out}")
        for value in (token, secret):
            if value in out:
                failures.append(f"{name}: the output prints a secret's value:\n{out}")

    expect("a clean directory passes", clean, 0, ["OK"], require=["rust", "steps"])

    def token_in_nested_log(root):
        clean(root)
        write(root, "rust/deep/er/x.log", f"line 1\nAuthorization: Bearer {token}\n")

    expect("a planted token fails", token_in_nested_log, 1, ["LEAK rust/deep/er/x.log line 2", "rust: token"])

    def secret_in_step_log(root):
        clean(root)
        write(root, "steps/4-e2e.log", f"secret={secret}")

    expect("a planted secret in a step log fails", secret_in_step_log, 1, ["rust.secrets line 4"])

    def secret_in_other_sources_log(root):
        clean(root)
        write(root, "e2e.secrets", "e2e token\tanother-secret-for-e2e-0000\n")
        write(root, "e2e/daemon-1.log", f"x {token} y")

    expect("a secret of one source in another's log fails", secret_in_other_sources_log, 1, ["LEAK e2e/daemon-1.log"])

    def binary_log(root):
        clean(root)
        (root / "rust" / "bin.log").write_bytes(b"\xff\xfe\x00" + token.encode() + b"\x80")

    expect("a secret between invalid UTF-8 fails", binary_log, 1, ["LEAK rust/bin.log"])

    def short_secret(root):
        clean(root)
        write(root, "rust.secrets", f"token\t{token}\nshort\tshort-secret\n")

    expect("a short secret is refused", short_secret, 1, ["too weak"])

    expect("an empty directory fails", lambda root: None, 1, ["no secrets read", "no log bytes read"])

    def no_logs(root):
        write(root, "rust.secrets", f"token\t{token}\n")

    expect("secrets without logs fail", no_logs, 1, ["the check read nothing"])

    def empty_logs(root):
        write(root, "rust.secrets", f"token\t{token}\n")
        write(root, "rust/daemon.log", "")

    expect("empty log files fail", empty_logs, 1, ["the check read nothing"])

    def logs_without_secrets(root):
        clean(root)
        write(root, "e2e/daemon-1.log", "INFO ready\n")

    expect("logs without secrets fail", logs_without_secrets, 1, ["e2e: logs but no e2e.secrets"])

    def empty_secrets_file(root):
        clean(root)
        write(root, "e2e.secrets", "# nothing\n")
        write(root, "e2e/daemon-1.log", "INFO ready\n")

    expect("an empty secrets file fails", empty_secrets_file, 1, ["e2e.secrets lists no usable secret"])

    expect("a required source that left nothing fails", clean, 1, ["e2e: required"], require=["e2e"])

    for f in failures:
        print(f"check_secrets self-test: FAIL {f}", file=sys.stderr)
    if failures:
        return 1
    print("check_secrets self-test: OK (a planted secret fails the check, a clean directory passes)")
    return 0


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log_dir", nargs="?", default=os.environ.get("Z4J_TEST_LOG_DIR"))
    ap.add_argument("--require", action="append", default=[], metavar="SOURCE",
                    help="fail unless SOURCE left logs (and, except for steps, secrets)")
    ap.add_argument("--self-test", action="store_true", help="check the checker on planted secrets")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test()
    if not args.log_dir:
        ap.error("no LOG_DIR given and Z4J_TEST_LOG_DIR is not set")
    return check(Path(args.log_dir), args.require)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
