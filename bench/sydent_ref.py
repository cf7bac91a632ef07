"""Run the reference Matrix identity server, Sydent 2.6.1, for benchmarks.

The bench harness imports this module from whatever interpreter it runs in, so
it uses the Python 3.11 standard library only. Sydent itself lives in its own
venv (see `ensure_venv`) and is only ever run as a subprocess of that venv's
python; anything that needs Sydent's code (schema creation, key generation,
signing in the self-test) is done by running a short script there.

Everything here was checked against Sydent 2.6.1's own source:

* config keys: sydent/config/__init__.py (CONFIG_DEFAULTS) and
  sydent/config/{general,http,email,crypto,database}.py;
* schema: sydent/db/*.sql plus the migrations in sydent/db/sqlitedb.py
  (schema version 5 = `PRAGMA user_version`);
* lookup hash: sydent/util/hash.py and sydent/threepid/bind.py, i.e.
  unpadded URL-safe base64 of sha256(f"{address} {medium} {pepper}");
* pepper: sydent/db/hashing_metadata.py (one row, id 0, in hashing_metadata);
* what a bind writes: sydent/threepid/bind.py + sydent/replication/peer.py
  (LocalPeer) + sydent/db/threepid_associations.py;
* tokens: sydent/db/accounts.py, sydent/users/tokens.py, sydent/http/auth.py.

Run `python3 bench/sydent_ref.py --selftest` to prove the whole chain works.
"""

from __future__ import annotations

import argparse
import binascii
import configparser
import contextlib
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import socketserver
import sqlite3
import string
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

SYDENT_VERSION = "2.6.1"

#: Where the self-test (and, by default, the harness) keeps Sydent's venv.
DEFAULT_VENV_DIR = Path(__file__).resolve().parent / ".venvs" / "sydent"

#: Sub-directory of the venv into which `ensure_venv` unpacks Sydent's email
#: and web templates. The wheel on PyPI does not ship them (only the sdist's
#: top-level res/ has them), and Sydent's default `templates.path` is a
#: relative "res", so without this Sydent cannot send any mail.
TEMPLATES_SUBDIR = "sydent-res"

#: Schema version Sydent 2.6.1 migrates to (sydent/db/sqlitedb.py).
SCHEMA_VERSION = 5

# Exact versions the self-test passed with on Python 3.11, installed as
# constraints so the venv is reproducible. Only one of them is *needed*:
# sydent/sydent.py and sydent/util/emailutils.py import prometheus_client
# unconditionally, but the 2.6.1 wheel declares it only under the
# "prometheus" extra, so a plain `pip install matrix-sydent==2.6.1` cannot
# start. Current Twisted (26.x) works; no older pin was required.
# signedjson==1.1.1 is Sydent's own hard pin.
_PINS: tuple[str, ...] = (
    f"matrix-sydent=={SYDENT_VERSION}",
    "prometheus-client==0.26.0",
    "Twisted==26.10.0",
    "attrs==26.1.0",
    "Automat==25.4.16",
    "canonicaljson==2.0.0",
    "cffi==2.1.1",
    "constantly==23.10.4",
    "cryptography==50.0.2",
    "hyperlink==21.0.0",
    "idna==3.20",
    "importlib_metadata==10.2.0",
    "Incremental==24.11.0",
    "Jinja2==3.1.6",
    "lazy-importer==0.1.0",
    "MarkupSafe==3.0.4",
    "matrix-common==1.3.0",
    "netaddr==1.3.0",
    "packaging==26.3",
    "phonenumbers==9.0.43",
    "pycparser==3.12",
    "PyNaCl==1.6.2",
    "pyOpenSSL==26.4.0",
    "PyYAML==6.0.3",
    "service-identity==26.1.0",
    "signedjson==1.1.1",
    "sortedcontainers==2.4.0",
    "typing_extensions==4.16.0",
    "unpaddedbase64==2.1.0",
    "zipp==4.1.2",
    "zope.interface==8.7",
)

# Printed by the venv's python to prove the install is usable (imports the
# same modules Sydent's entry point does).
_VENV_PROBE = "import importlib.metadata as m, sydent.sydent, prometheus_client;print(m.version('matrix-sydent'))"


# --------------------------------------------------------------------------
# venv
# --------------------------------------------------------------------------


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def templates_dir_for(venv_dir: Path) -> Path:
    """Where `ensure_venv` put Sydent's default templates (res/ of the sdist)."""
    return venv_dir / TEMPLATES_SUBDIR


def _venv_ok(venv_dir: Path) -> bool:
    py = _venv_python(venv_dir)
    if not py.exists() or not (templates_dir_for(venv_dir) / "matrix-org").is_dir():
        return False
    r = subprocess.run([str(py), "-c", _VENV_PROBE], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == SYDENT_VERSION


def ensure_venv(venv_dir: Path) -> Path:
    """Create `venv_dir` with matrix-sydent==2.6.1 installed and return its python.

    Idempotent: an existing venv that imports Sydent 2.6.1 and has the
    templates is reused as is. Otherwise the venv is (re)built: pip installs
    the pinned set in `_PINS`, and the sdist is downloaded only to unpack its
    res/ directory (the templates) into `templates_dir_for(venv_dir)`.
    """
    venv_dir = Path(venv_dir).resolve()
    if _venv_ok(venv_dir):
        return _venv_python(venv_dir)

    py = _venv_python(venv_dir)
    if not py.exists():
        # sys.executable may itself be a venv; `-m venv` then bases the new
        # venv on the underlying interpreter, which is what we want.
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", *_PINS], check=True)

    # Templates: take res/ from the sdist of the very same release.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, f"matrix-sydent=={SYDENT_VERSION}"],
            check=True,
        )
        sdists = list(Path(tmp).glob("matrix_sydent-*.tar.gz")) + list(Path(tmp).glob("matrix-sydent-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"no matrix-sydent sdist downloaded into {tmp}")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="data")
        res = next(Path(tmp).glob("matrix*sydent-*/res"))
        dest = templates_dir_for(venv_dir)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(res, dest)

    if not _venv_ok(venv_dir):
        raise RuntimeError(f"Sydent venv at {venv_dir} is still not usable")
    return py


def _run_in_venv(python: Path, code: str, stdin: str | None = None) -> str:
    """Run `code` with Sydent's python; return stdout, raise with stderr."""
    r = subprocess.run([str(python), "-c", code], input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"venv script failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r.stdout


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------


def _esc(value: object) -> str:
    # Sydent reads most keys through ConfigParser's %-interpolation.
    return str(value).replace("%", "%%")


def write_config(
    workdir: Path,
    *,
    port: int,
    smtp_port: int,
    server_name: str,
    signing_key: str,
    templates_dir: Path | None = None,
    log_level: str = "WARNING",
    email_ratelimit_burst: int | None = None,
    email_ratelimit_rate_hz: float | None = None,
) -> Path:
    """Write workdir/sydent.conf for Sydent 2.6.1 and return its path.

    Client API on 127.0.0.1:`port`; DB workdir/sydent.db; mail by plain SMTP
    (tlsmode 0, no login) to 127.0.0.1:`smtp_port`; no terms; log file
    workdir/sydent.log at `log_level`.

    Listeners: only the client API. The replication HTTPS server is only
    started when `replication.https.certfile` names a readable cert, which we
    leave empty (its bind address is still set to loopback, port 0); the
    internal API is off (empty port); prometheus is off (no prometheus_port).

    Templates: Sydent's shipped res/ (from `templates_dir`, default the one in
    DEFAULT_VENV_DIR) is copied to workdir/res and used with the default brand
    "matrix-org"; the .j2 (Jinja) variants are the ones Sydent picks.

    Email rate limit: Sydent limits *both* requestToken (v2: per account;
    v1: per client IP) and store-invite (per sender) through one shared
    bucket, by default burst 5, drained at 1/300 Hz. Pass
    `email_ratelimit_burst` / `email_ratelimit_rate_hz` to change it (keys
    email.ratelimit_sender.burst / .rate_hz); None keeps Sydent's default.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if len(signing_key.split(" ")) != 3:
        # A 1- or 0-part key makes Sydent rewrite the config file at start.
        raise ValueError("signing_key must be 'ed25519 <version> <base64 seed>'")

    src = Path(templates_dir) if templates_dir else templates_dir_for(DEFAULT_VENV_DIR)
    if not (src / "matrix-org" / "verification_template.eml.j2").is_file():
        raise RuntimeError(f"Sydent templates not found in {src}; run ensure_venv first")
    res = workdir / "res"
    shutil.rmtree(res, ignore_errors=True)
    shutil.copytree(src, res)

    email: dict[str, object] = {
        "email.smtphost": "127.0.0.1",
        "email.smtpport": smtp_port,
        "email.tlsmode": "0",  # anything but SSL/TLS/STARTTLS = plain SMTP
        "email.smtpusername": "",  # empty = no AUTH
        "email.smtppassword": "",
        # Set explicitly: empty means socket.getfqdn() (a DNS lookup), and
        # the default From literally contains "{hostname}".
        "email.hostname": server_name,
        "email.from": f"Sydent Validation <noreply@{server_name}>",
    }
    if email_ratelimit_burst is not None:
        email["email.ratelimit_sender.burst"] = email_ratelimit_burst
    if email_ratelimit_rate_hz is not None:
        email["email.ratelimit_sender.rate_hz"] = email_ratelimit_rate_hz

    sections: dict[str, Mapping[str, object]] = {
        "general": {
            "server.name": server_name,
            "log.path": workdir / "sydent.log",
            "log.level": log_level,
            "pidfile.path": workdir / "sydent.pid",
            "terms.path": "",  # no terms: authV2 never asks for consent
            "templates.path": res,
            "brand.default": "matrix-org",
        },
        "db": {"db.file": workdir / "sydent.db"},
        "http": {
            "clientapi.http.bind_address": "127.0.0.1",
            "clientapi.http.port": port,
            "client_http_base": f"http://127.0.0.1:{port}",  # links in mails
            "internalapi.http.bind_address": "127.0.0.1",
            "internalapi.http.port": "",  # empty = not started
            "replication.https.certfile": "",  # empty = not started
            "replication.https.bind_address": "127.0.0.1",
            "replication.https.port": 0,
            "obey_x_forwarded_for": "False",
        },
        "email": email,
        "crypto": {"ed25519.signingkey": signing_key},
    }
    cfg = configparser.ConfigParser(interpolation=None)
    for name, values in sections.items():
        cfg[name] = {k: _esc(v) for k, v in values.items()}
    path = workdir / "sydent.conf"
    with path.open("w") as f:
        cfg.write(f)
    return path


def _server_name_from_config(config: Path) -> str:
    cfg = configparser.ConfigParser()
    cfg.read(config)
    return cfg.get("general", "server.name")


# --------------------------------------------------------------------------
# database
# --------------------------------------------------------------------------

# Sydent's own startup code path for the DB (SqliteDatabase runs the v0 .sql
# files, then the v0->v5 migrations). It only needs `.config`, so no reactor,
# port or pepper is involved.
_INIT_DB = """
import sys
from sydent.config import SydentConfig
from sydent.db.sqlitedb import SqliteDatabase
cfg = SydentConfig()
cfg.parse_config_file(sys.argv[1])
class _Syd:
    config = cfg
db = SqliteDatabase(_Syd()).db
db.commit()
print(db.execute("PRAGMA user_version").fetchone()[0])
db.close()
"""


def init_db(python: Path, config: Path, workdir: Path) -> None:
    """Create Sydent's schema in workdir/sydent.db using Sydent's own code.

    Runs sydent.db.sqlitedb.SqliteDatabase (what `Sydent.__init__` does
    first) against the config, leaving a schema-version-5 DB. It does not
    create a lookup pepper: `seed` stores one, or Sydent generates one at its
    first start.
    """
    r = subprocess.run([str(python), "-c", _INIT_DB, str(config)], cwd=workdir, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"Sydent schema creation failed:\n{r.stderr[-4000:]}")
    version = int(r.stdout.strip().splitlines()[-1])
    if version != SCHEMA_VERSION:
        raise RuntimeError(f"Sydent DB at schema {version}, expected {SCHEMA_VERSION}")


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    """Sydent's lookup_hash: unpadded URL-safe base64 of sha256("addr medium pepper").

    (sydent/util/hash.py; the string is joined with single spaces in
    sydent/threepid/bind.py.) binascii rather than base64.urlsafe_b64encode
    only because seed() calls this a million times.
    """
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    return binascii.b2a_base64(digest, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _normalise_address(address: str, medium: str) -> str:
    # sydent.util.stringutils.normalise_address: emails are casefolded
    # before being stored and hashed.
    return address.casefold() if medium == "email" else address


Row = tuple[str, str, str, int, int, int, str]


def _chunks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def seed(
    db_path: Path,
    rows: Iterable[Row],
    pepper: str,
    *,
    server_name: str | None = None,
) -> int:
    """Insert associations as a Sydent bind + local push would; return the count.

    Each row is (medium, address, mxid, ts, not_before, not_after,
    sg_assoc_json). For each, like sydent/threepid/bind.py and LocalPeer:

    * local_threepid_associations: (id, medium, address, lookup_hash, mxid,
      ts, notBefore, notAfter), "insert or replace" as Sydent does;
    * global_threepid_associations: same fields plus originServer =
      server name, originId = the local row id, sgAssoc = the given JSON.

    originServer must equal Sydent's server.name: at the next bind Sydent
    copies every local row with id > max(originId of its own server) into the
    global table, so a wrong name would make it re-push everything.
    `server_name` defaults to server.name in sydent.conf next to the DB (as
    `write_config` lays it out).

    Addresses are stored and hashed after Sydent's normalisation (email is
    casefolded). `pepper` becomes the lookup pepper (hashing_metadata id 0),
    so Sydent neither generates a new one nor rehashes at start.

    One transaction, executemany in chunks; the caller's timestamps decide
    whether lookups see a row (Sydent requires notBefore < now < notAfter).
    """
    db_path = Path(db_path)
    if server_name is None:
        conf = db_path.parent / "sydent.conf"
        if not conf.is_file():
            raise ValueError(f"server_name not given and {conf} not found")
        server_name = _server_name_from_config(conf)

    con = sqlite3.connect(db_path, isolation_level=None)
    try:
        (version,) = con.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"{db_path} is at schema {version}; run init_db first")
        # A seed is rebuilt from scratch if interrupted, so trade durability
        # for speed; these pragmas last for this connection only.
        con.execute("PRAGMA synchronous = OFF")
        con.execute("PRAGMA cache_size = -1048576")  # 1 GiB page cache
        con.execute("PRAGMA temp_store = MEMORY")
        con.execute("BEGIN IMMEDIATE")

        # Continue Sydent's AUTOINCREMENT sequence for the local table.
        (next_id,) = con.execute(
            "SELECT max(coalesce((SELECT max(id) FROM local_threepid_associations), 0),"
            " coalesce((SELECT seq FROM sqlite_sequence"
            "           WHERE name = 'local_threepid_associations'), 0)) + 1"
        ).fetchone()

        con.execute(
            "INSERT OR REPLACE INTO hashing_metadata (id, lookup_pepper) VALUES (0, ?)",
            (pepper,),
        )

        # Into an empty global table, building its four (random-keyed)
        # indexes once at the end is several times faster than updating them
        # row by row. They are re-created from the exact SQL Sydent's
        # migrations left in sqlite_master. The local table keeps its UNIQUE
        # (medium, address) index: "insert or replace" depends on it.
        deferred: list[str] = []
        if con.execute("SELECT 1 FROM global_threepid_associations LIMIT 1").fetchone() is None:
            for name, sql in con.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                " AND tbl_name = 'global_threepid_associations' AND sql IS NOT NULL"
            ).fetchall():
                deferred.append(sql)
                con.execute(f'DROP INDEX "{name}"')

        count = 0
        for chunk in _chunks(rows, 50_000):
            local: list[tuple[Any, ...]] = []
            glob: list[tuple[Any, ...]] = []
            for medium, address, mxid, ts, not_before, not_after, sg in chunk:
                address = _normalise_address(address, medium)
                h = lookup_hash(address, medium, pepper)
                local.append((next_id, medium, address, h, mxid, ts, not_before, not_after))
                glob.append((medium, address, h, mxid, ts, not_before, not_after, server_name, next_id, sg))
                next_id += 1
            con.executemany(
                "INSERT OR REPLACE INTO local_threepid_associations"
                " (id, medium, address, lookup_hash, mxid, ts, notBefore, notAfter)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                local,
            )
            con.executemany(
                "INSERT INTO global_threepid_associations"
                " (medium, address, lookup_hash, mxid, ts, notBefore, notAfter,"
                "  originServer, originId, sgAssoc)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                glob,
            )
            count += len(chunk)
        for sql in deferred:
            con.execute(sql)
        con.execute("COMMIT")
        return count
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()


def create_token(db_path: Path, user_id: str) -> str:
    """Create an account + v2 access token for `user_id`; return the token.

    Mirrors sydent/users/tokens.py issueToken (64 alphanumerics). The token
    is accepted as `Authorization: Bearer <token>` (or ?access_token=). Note
    that v2 store-invite also requires `sender` == this user_id.
    """
    alphabet = string.ascii_letters + string.digits
    token = "".join(secrets.choice(alphabet) for _ in range(64))
    con = sqlite3.connect(db_path)
    try:
        with con:
            con.execute(
                "INSERT OR IGNORE INTO accounts (user_id, created_ts, consent_version) VALUES (?, ?, NULL)",
                (user_id, int(time.time() * 1000)),
            )
            con.execute("INSERT INTO tokens (user_id, token) VALUES (?, ?)", (user_id, token))
    finally:
        con.close()
    return token


# --------------------------------------------------------------------------
# process control
# --------------------------------------------------------------------------


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return f"({path} unreadable)"


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, http.client.HTTPException):
        return None


def start(python: Path, config: Path, workdir: Path, port: int, timeout: float = 60) -> subprocess.Popen[bytes]:
    """Start Sydent and wait until GET /_matrix/identity/v2 answers 200.

    Runs `python -m sydent.sydent` (what the `sydent` console script does)
    with SYDENT_CONF=config, cwd=workdir, in its own process group; its
    stdout/stderr go to workdir/sydent.stdout.log, its log to the file set in
    the config. Raises RuntimeError with the logs' tails on failure.
    """
    workdir = Path(workdir)
    env = dict(os.environ, SYDENT_CONF=str(Path(config).resolve()))
    out_path = workdir / "sydent.stdout.log"
    with out_path.open("ab") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "sydent.sydent"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/_matrix/identity/v2"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            why = f"Sydent exited with code {proc.returncode} before listening"
            break
        if _http_status(url) == 200:
            return proc
        if time.monotonic() > deadline:
            why = f"Sydent did not answer 200 on {url} within {timeout} s"
            stop(proc)
            break
        time.sleep(0.2)
    raise RuntimeError(
        f"{why}\n--- {out_path} ---\n{_tail(out_path)}"
        f"\n--- {workdir / 'sydent.log'} ---\n{_tail(workdir / 'sydent.log')}"
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM Sydent's process group, wait up to 10 s, then SIGKILL it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # start() made pid == pgid
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --------------------------------------------------------------------------
# a counting SMTP sink (stdlib; usable by the harness too)
# --------------------------------------------------------------------------


class SmtpSink:
    """Minimal SMTP responder on loopback that accepts and counts messages.

    Speaks just enough ESMTP for smtplib.SMTP.sendmail (what Sydent uses):
    EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT. No TLS, no AUTH. One thread
    per connection (Sydent opens a new connection per mail).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep_messages: bool = True) -> None:
        sink = self
        self.count = 0
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.keep_messages = keep_messages
        self._lock = threading.Lock()

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                w, r = self.wfile, self.rfile
                w.write(b"220 sink ESMTP\r\n")
                mail_from, rcpts = "", list[str]()
                while line := r.readline(65536):
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        w.write(b"250-sink\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
                    elif verb == b"MAIL":
                        mail_from, rcpts = line.decode(errors="replace").strip(), []
                        w.write(b"250 OK\r\n")
                    elif verb == b"RCPT":
                        rcpts.append(line.decode(errors="replace").strip())
                        w.write(b"250 OK\r\n")
                    elif verb == b"DATA":
                        w.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        data = bytearray()
                        while (dl := r.readline(1 << 20)) not in (b".\r\n", b".\n", b""):
                            data += dl
                        sink._record(mail_from, rcpts, bytes(data))
                        w.write(b"250 OK queued\r\n")
                    elif verb == b"QUIT":
                        w.write(b"221 Bye\r\n")
                        return
                    else:  # HELO, RSET, NOOP, ...
                        w.write(b"250 OK\r\n")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="smtp-sink", daemon=True)

    def _record(self, mail_from: str, rcpts: list[str], data: bytes) -> None:
        with self._lock:
            self.count += 1
            if self.keep_messages:
                self.messages.append((mail_from, rcpts, data))

    def start(self) -> SmtpSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# signing helpers (run in Sydent's venv: signedjson is there)
# --------------------------------------------------------------------------


def generate_signing_key(python: Path) -> str:
    """A fresh key as 'ed25519 0 <unpadded base64 seed>' (Synapse/Sydent format)."""
    return _run_in_venv(
        python,
        (
            "import signedjson.key as k;"
            "s = k.generate_signing_key('0');"
            "print(s.alg, s.version, k.encode_signing_key_base64(s))"
        ),
    ).strip()


_SIGN = """
import json, sys
import signedjson.key, signedjson.sign
alg, version, seed = sys.argv[1].split(" ")
key = signedjson.key.decode_signing_key_base64(alg, version, seed)
server = sys.argv[2]
out = sys.stdout
for line in sys.stdin:
    # json.dumps with default separators: how LocalPeer stores sgAssoc.
    out.write(json.dumps(signedjson.sign.sign_json(json.loads(line), server, key)) + "\\n")
"""


def sign_json_batch(python: Path, signing_key: str, server_name: str, objs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Matrix-sign each object under `server_name` / ed25519:<version>; JSON strings."""
    stdin = "".join(json.dumps(o) + "\n" for o in objs)
    r = subprocess.run(
        [str(python), "-c", _SIGN, signing_key, server_name], input=stdin, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"signing failed:\n{r.stderr[-4000:]}")
    return r.stdout.splitlines()


# --------------------------------------------------------------------------
# self-test
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _wait_for(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _selftest(venv_dir: Path, keep: bool, timing_rows: int) -> int:
    t0 = time.monotonic()
    python = ensure_venv(venv_dir)
    print(f"venv: {python} (Sydent {SYDENT_VERSION}) ready in {time.monotonic() - t0:.1f} s")

    server_name = "is.bench.example"
    key = generate_signing_key(python)
    tmp = Path(tempfile.mkdtemp(prefix="sydent-selftest-"))
    failures: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        if not ok:
            failures.append(name)

    proc: subprocess.Popen[bytes] | None = None
    sink = SmtpSink().start()
    try:
        workdir = tmp / "sydent"
        port = _free_port()
        config = write_config(workdir, port=port, smtp_port=sink.port, server_name=server_name, signing_key=key)
        init_db(python, config, workdir)
        db = workdir / "sydent.db"

        # 1,000 bindings, signed exactly as Sydent signs a new association.
        now = int(time.time() * 1000)
        n = 1000
        assocs: list[dict[str, Any]] = [
            {
                "medium": "email",
                "address": f"user{i}@bench.example",
                "mxid": f"@user{i}:hs.example",
                "ts": now - 60_000,
                "not_before": now - 60_000,
                "not_after": now - 60_000 + 100 * 365 * 24 * 3600 * 1000,
            }
            for i in range(n)
        ]
        signed = sign_json_batch(python, key, server_name, assocs)
        pepper = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(5))
        rows = [
            (a["medium"], a["address"], a["mxid"], a["ts"], a["not_before"], a["not_after"], sg)
            for a, sg in zip(assocs, signed, strict=True)
        ]
        print(f"seeded {seed(db, rows, pepper)} associations (pepper {pepper!r})")
        # The sender of store-invite must be the token's user (v2 auth).
        token = create_token(db, "@s:hs.example")

        proc = start(python, config, workdir, port)
        base = f"http://127.0.0.1:{port}"
        print(f"Sydent pid {proc.pid} listening on {base}")

        # 1. v2 status
        st, body = _request("GET", f"{base}/_matrix/identity/v2")
        check("GET /v2", st == 200, f"{st} {body}")

        # 2. hash_details
        st, body = _request("GET", f"{base}/_matrix/identity/v2/hash_details", token=token)
        check("hash_details", st == 200 and body.get("lookup_pepper") == pepper, f"{st} {body}")

        # 3. hashed v2 lookup: 1000 hashes, every 10th of a seeded address
        hashes, expected = [], {}
        for i in range(1000):
            addr = f"user{i}@bench.example" if i % 10 == 0 else f"nobody{i}@bench.example"
            h = lookup_hash(addr, "email", pepper)
            hashes.append(h)
            if i % 10 == 0:
                expected[h] = f"@user{i}:hs.example"
        st, body = _request(
            "POST",
            f"{base}/_matrix/identity/v2/lookup",
            {"algorithm": "sha256", "pepper": pepper, "addresses": hashes},
            token=token,
        )
        mappings = body.get("mappings", {}) if st == 200 else {}
        check(
            "v2 lookup",
            st == 200 and mappings == expected,
            f"{st}, {len(mappings)} mappings, all correct: {mappings == expected}",
        )

        # 4. v1 single lookup returns the stored signed association
        st, body = _request("GET", f"{base}/_matrix/identity/api/v1/lookup?medium=email&address=user5@bench.example")
        check(
            "v1 lookup",
            st == 200 and body == json.loads(signed[5]) and body.get("mxid") == "@user5:hs.example",
            f"{st}, mxid {body.get('mxid')}, equals seeded sgAssoc: {body == json.loads(signed[5])}",
        )

        # 5. v1 bulk lookup: 1000 pairs, 100 bound
        pairs = [
            ["email", f"user{i}@bench.example" if i % 10 == 0 else f"nobody{i}@bench.example"] for i in range(1000)
        ]
        st, body = _request("POST", f"{base}/_matrix/identity/api/v1/bulk_lookup", {"threepids": pairs})
        got = {tuple(t) for t in body.get("threepids", [])} if st == 200 else set()
        want = {("email", f"user{i}@bench.example", f"@user{i}:hs.example") for i in range(0, 1000, 10)}
        check("v1 bulk_lookup", st == 200 and got == want, f"{st}, {len(got)} results, all correct: {got == want}")

        # 6. v2 email requestToken sends exactly one mail
        before = sink.count
        st, body = _request(
            "POST",
            f"{base}/_matrix/identity/v2/validate/email/requestToken",
            {"client_secret": secrets.token_hex(16), "email": "new1@bench.example", "send_attempt": 1},
            token=token,
        )
        _wait_for(lambda: sink.count > before)
        check(
            "v2 requestToken",
            st == 200 and "sid" in body and sink.count == before + 1,
            f"{st} {body}, mails {sink.count - before}",
        )

        # 7. v2 store-invite sends one more mail
        before = sink.count
        st, body = _request(
            "POST",
            f"{base}/_matrix/identity/v2/store-invite",
            {
                "medium": "email",
                "address": "invitee1@bench.example",
                "room_id": "!r:hs.example",
                "sender": "@s:hs.example",
            },
            token=token,
        )
        _wait_for(lambda: sink.count > before)
        check(
            "v2 store-invite",
            st == 200 and bool(body.get("token")) and sink.count == before + 1,
            f"{st}, token {str(body.get('token'))[:16]}..., mails {sink.count - before}",
        )
        if sink.messages:
            rcpts = [m[1] for m in sink.messages]
            print(f"SMTP sink got {sink.count} mails, recipients {rcpts}")
    finally:
        if proc is not None:
            stop(proc)
            print(f"Sydent stopped (exit code {proc.returncode})")
        sink.stop()

    # Seed timing on a fresh DB (placeholder signatures of realistic size:
    # the time of seed() itself is what is measured).
    twork = tmp / "timing"
    tconf = write_config(twork, port=_free_port(), smtp_port=sink.port, server_name=server_name, signing_key=key)
    init_db(python, tconf, twork)
    now = int(time.time() * 1000)
    fake_sig = "A" * 86

    def timing_rows_gen() -> Iterator[Row]:
        for i in range(timing_rows):
            a, m = f"user{i}@bench.example", f"@user{i}:hs.example"
            sg = json.dumps(
                {
                    "address": a,
                    "medium": "email",
                    "mxid": m,
                    "not_after": now + 10**12,
                    "not_before": now,
                    "ts": now,
                    "signatures": {server_name: {"ed25519:0": fake_sig}},
                }
            )
            yield ("email", a, m, now, now, now + 10**12, sg)

    rows_list = list(timing_rows_gen())
    t0 = time.perf_counter()
    cnt = seed(twork / "sydent.db", rows_list, "pepper")
    dt = time.perf_counter() - t0
    print(f"seed() of {cnt:,} rows took {dt:.2f} s ({cnt / dt:,.0f} rows/s)")

    if keep:
        print(f"kept workdir {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"SELFTEST FAILED: {', '.join(failures)}")
        return 1
    print("SELFTEST OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selftest", action="store_true", help="build the venv, run Sydent and check the endpoints")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV_DIR)
    ap.add_argument("--keep", action="store_true", help="keep the temp workdir")
    ap.add_argument("--timing-rows", type=int, default=100_000)
    args = ap.parse_args(argv)
    if not args.selftest:
        ap.print_help()
        return 2
    return _selftest(args.venv, args.keep, args.timing_rows)


if __name__ == "__main__":
    sys.exit(main())
