"""Helpers for the black-box end-to-end tests of sydent_lite.

Everything here drives the server from the outside, the way a client, a homeserver or a mail
server sees it:

- `smtp.SmtpSink` is the mail server the identity server delivers validation mail to;
- `homeserver.HomeserverStandIn` is a homeserver reachable over HTTPS (OpenID userinfo, server
  keys), with its own CA that the identity server is configured to trust;
- `db` creates a fresh SQLite or PostgreSQL database per server;
- `server.SydentServer` runs `python -m sydent_lite serve` as a subprocess, and
  `server.IdentityApi` wraps the usual client flows (register, accept terms, validate, bind);
- `inprocess.InProcessServer` is the same server run in the test process, on a
  `clock.FakeClock` the test advances (no subprocess start-up, no real waiting);
- `asserts` holds the checks several modules share (Matrix errors, pages, signed associations).
"""
