"""z4j_agentd._redact: what every engine integration does to arguments,
results and error text before they leave the process."""

import pytest

from z4j_agentd._redact import REDACTED, event_value, scrub, scrub_text, secret_key


@pytest.mark.parametrize("key", ["password", "PASSWORD", "api_key", "apiKey", "x-api-key", "accessToken",
                                 "access_token", "token", "client_secret", "Authorization", "cookie",
                                 "credentials", "cvv", "private_key"])
def test_secret_keys(key):
    assert secret_key(key)


@pytest.mark.parametrize("key", ["last_password_reset", "tokens_used", "user", "author", "id", 7, None,
                                 "password" * 40])
def test_ordinary_keys(key):
    assert not secret_key(key)


def test_scrub_replaces_values_under_secret_keys_at_any_depth():
    value = {"user": "ada", "password": "hunter2", "nested": [{"apiKey": {"v": 1}, "n": 2}],
             "tuple": ("a", {"token": 5})}
    assert scrub(value) == {"user": "ada", "password": REDACTED,
                            "nested": [{"apiKey": REDACTED, "n": 2}], "tuple": ["a", {"token": REDACTED}]}
    assert value["password"] == "hunter2"  # the caller's object is left alone


def test_scrub_text_keeps_the_text_around_a_secret():
    text = ('Traceback ...\nConnectionError: redis://app:s3cr3t@redis:6379/0 refused; '
            'Authorization: Bearer abcdefghijklmnop1234; jwt eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl; '
            'key sk_live_' + "a" * 24 + ' end')
    out = scrub_text(text)
    for secret in ("s3cr3t", "abcdefghijklmnop1234", "eyJzdWIiOi", "sk_live_"):
        assert secret not in out
    assert "redis://app:[REDACTED]@redis:6379/0 refused" in out
    assert out.startswith("Traceback ...") and out.endswith(" end")
    assert scrub_text("nothing to see at http://example.com/a:b") == "nothing to see at http://example.com/a:b"
    assert scrub_text(None) is None


def test_scrub_text_removes_a_private_key_block():
    text = "key=-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY----- done"
    assert scrub_text(text) == "key=" + REDACTED + " done"


def test_strings_in_arguments_are_scrubbed_too():
    assert scrub(["postgres://u:pw@db/x", 3]) == ["postgres://u:[REDACTED]@db/x", 3]


def test_extra_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("Z4J_AGENTD_REDACT_KEYS", " pin , Account_Number")
    assert scrub({"pin": 1234, "account_number": "x", "account": "y"}) == {
        "pin": REDACTED, "account_number": REDACTED, "account": "y"}


def test_event_value_scrubs_then_cuts():
    out = event_value({"password": "x" * 100000, "n": 1}, 1000)
    assert out == {"password": REDACTED, "n": 1}
    cut = event_value(["y" * 5000], 1000)
    assert isinstance(cut, str) and "truncated" in cut


def test_event_value_work_is_bounded_by_what_it_keeps():
    import time

    huge = "a" * 20_000_000
    rows = [{"id": i, "name": f"row {i}", "password": "x"} for i in range(100_000)]
    t0 = time.perf_counter()
    cut = event_value(huge, 65536)
    listed = event_value(rows, 65536)
    took = time.perf_counter() - t0
    assert isinstance(cut, str) and "truncated" in cut and len(cut) < 70000
    # the first rows are kept (and scrubbed), the rest named, not walked
    assert isinstance(listed, (list, str))
    text = repr(listed)
    assert "row 0" in text and '"password":"x"' not in text and "'password': 'x'" not in text
    assert "truncated" in text or "left out" in text
    assert took < 5.0  # a bound against walking all of it (20 MB + 100k rows took ~1.5 s before); not a speed target


def test_a_secret_straddling_the_cut_is_still_replaced():
    value = "y" * 2000 + " redis://app:hunter2hunter2@db:6379/0 " + "z" * 5000
    for budget in range(1990, 2040, 3):
        out = event_value(value, budget)
        assert "hunter2" not in out, budget


def test_event_value_never_looks_at_what_it_leaves_out():
    seen = []

    class Row:
        def __repr__(self):
            seen.append(1)
            return "row"

    out = event_value([Row() for _ in range(100_000)], 1000)
    assert "left out" in repr(out)
    assert 0 < len(seen) < 1000  # the old code made all 100,000 into text before cutting
