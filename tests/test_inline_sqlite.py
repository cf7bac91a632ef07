"""storage.inline_sqlite runs aiosqlite connections on the event loop by overriding aiosqlite
internals (true of 0.20-0.22). Its start-up check passes on the installed aiosqlite and refuses,
with a message naming the supported versions, an aiosqlite whose internals have changed: one
that lost `Connection._execute`, one that no longer sets the attributes, and one whose calls
go around `_execute` to its worker thread (which inline connections never start)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from sydent_lite import cli
from sydent_lite.storage.database import open_database
from sydent_lite.storage.inline_sqlite import AiosqliteChanged, check_aiosqlite_internals

SUPPORTED = "install 'aiosqlite>=0.20,<0.23'"


def test_the_installed_aiosqlite_passes() -> None:
    check_aiosqlite_internals()


def test_without_connection_execute_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(aiosqlite.Connection, "_execute")
    with pytest.raises(AiosqliteChanged, match=re.escape("Connection._execute is gone")) as info:
        check_aiosqlite_internals()
    assert SUPPORTED in str(info.value)


def test_renamed_attributes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    original = aiosqlite.Connection.__init__

    def renamed(self: aiosqlite.Connection, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.__dict__["_conn_factory"] = self.__dict__.pop("_connector")

    monkeypatch.setattr(aiosqlite.Connection, "__init__", renamed)
    with pytest.raises(AiosqliteChanged, match="no longer sets _connector"):
        check_aiosqlite_internals()


class _WorkerThreadReply:
    """What awaiting aiosqlite's worker thread does to a coroutine: it suspends."""

    def __await__(self) -> Generator[None, None, None]:
        yield


def _through_the_worker_thread(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` as an aiosqlite that hands it to its thread itself, not through _execute."""

    @functools.wraps(method)
    async def queued(self: aiosqlite.Connection) -> Any:
        await _WorkerThreadReply()
        return method(self)

    return queued


def test_a_call_that_goes_around_execute_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiosqlite.Connection, "commit", _through_the_worker_thread(aiosqlite.Connection.commit))
    with pytest.raises(AiosqliteChanged, match=re.escape("commit goes around Connection._execute")):
        check_aiosqlite_internals()


def test_opening_a_sqlite_database_checks_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delattr(aiosqlite.Connection, "_execute")
    with pytest.raises(AiosqliteChanged):
        open_database(f"sqlite:///{tmp_path}/db.sqlite")


def test_the_command_line_says_why_and_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delattr(aiosqlite.Connection, "_execute")
    path = tmp_path / "config.yaml"
    path.write_text(f"database: {{url: 'sqlite:///{tmp_path}/db.sqlite'}}\nsigning_key_path: {tmp_path}/signing.key\n")
    assert cli.main(["migrate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sydent-lite: aiosqlite ") and SUPPORTED in err, err
    assert not (tmp_path / "db.sqlite").exists()
