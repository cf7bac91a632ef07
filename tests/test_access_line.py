"""The access line of the real server: the client's address first (as nginx and Sydent log
it; behind `listen.trusted_proxies` the one X-Forwarded-For names), or not with
`log_client_address: false`; never a token, a looked-up address or a query string."""

from __future__ import annotations

import re
from collections.abc import Callable

from support.server import V1, V2, SydentServer, new_secret, wait_until


def _access_line(server: SydentServer, request_id: str) -> str:
    pattern = re.compile(rf"INFO sydent_lite\.access \[{re.escape(request_id)}\] (.*)")
    wait_until(lambda: bool(pattern.search(server.output())), timeout=10, what="the access line")
    found = pattern.search(server.output())
    assert found is not None
    return found.group(1)


def _rid() -> str:
    return "acc-" + new_secret()[:20].replace("_", "-")


def test_the_client_address_is_logged_by_default(make_server: Callable[..., SydentServer]) -> None:
    server = make_server()
    rid = _rid()
    server.client.get(V2, headers={"X-Request-Id": rid, "X-Forwarded-For": "198.51.100.66"})
    # No trusted proxy: the header is anyone's to write, and ignored.
    assert re.fullmatch(r"127\.0\.0\.1 GET /_matrix/identity/v2 200 [\d.]+ms", _access_line(server, rid))


def test_log_client_address_false_leaves_it_out(make_server: Callable[..., SydentServer]) -> None:
    server = make_server(extra_config={"log_client_address": False})
    rid = _rid()
    server.client.get(V2, headers={"X-Request-Id": rid})
    assert re.fullmatch(r"GET /_matrix/identity/v2 200 [\d.]+ms", _access_line(server, rid))


def test_behind_a_trusted_proxy_the_forwarded_client_is_logged(make_server: Callable[..., SydentServer]) -> None:
    server = make_server(extra_config={"listen": {"trusted_proxies": ["127.0.0.1"]}})
    rid = _rid()
    resp = server.client.get(
        f"{V1}/lookup",
        params={"medium": "email", "address": "alice.secret@example.org"},
        headers={"X-Request-Id": rid, "X-Forwarded-For": "203.0.113.9"},
    )
    assert resp.status_code == 200, resp.text
    line = _access_line(server, rid)
    assert re.fullmatch(r"203\.0\.113\.9 GET /_matrix/identity/api/v1/lookup 200 [\d.]+ms", line), line
    assert "alice" not in server.output()
