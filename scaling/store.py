"""Where runs are recorded: the tracking URI's checks (before MLflow, Ray or torch are imported), and
opening the store, a new SQLite one created whole or not at all.

A study's driver imports MLflow while Ray starts (import_mlflow); every client comes from
make_client, which creates a new SQLite store under a lock on its folder, under another name
renamed once migrated, and turns a file that is no store into a one-line ConfigError.
"""
from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

from scaling import interrupts
from scaling.config import ConfigError
from scaling.heap import imports_without_gc


def sqlite_path(uri: str) -> Optional[Path]:
    """Return the database file of a `sqlite:///` URI (sqlite:///rel.db -> rel.db, sqlite:////abs.db
    -> /abs.db), None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None  # no ~: MLflow keeps it



def check_tracking_uri(uri: str, timeout_s: float = 3.0) -> None:
    """Raise ConfigError unless the tracking store at `uri` can be reached (no mlflow import)."""
    scheme = uri.split(":", 1)[0] if ":" in uri else "file"
    if scheme in ("http", "https"):
        # /health needs no login, and urllib cannot take a user and password in the URL (MLflow's client can)
        parts = urllib.parse.urlsplit(uri)
        health = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as r:
                if r.status != 200:
                    raise ConfigError("mlflow.tracking_uri", uri, f"server answered HTTP {r.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError("mlflow.tracking_uri", uri, f"tracking server unreachable ({reason})") from None
    elif scheme in ("sqlite", "file"):
        db = sqlite_path(uri)
        if db is not None:
            if db.is_dir():
                raise ConfigError("mlflow.tracking_uri", uri, f"names a folder ({db.resolve()}), not a database file")
            _check_sqlite_file(uri, db)
            folder = db.resolve().parent
        else:
            folder = Path(uri.split("://", 1)[1] if "://" in uri else uri).expanduser().resolve()
        check_writable("mlflow.tracking_uri", uri, folder)
    elif scheme.split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        _check_db_driver(uri)


# SQLite's primary result codes for a file that may be read later but not now: a read-only connection
# that meets a hot journal (a writer killed mid-transaction: a study driver's SIGKILL) cannot roll it
# back (SQLITE_READONLY_ROLLBACK), and another writer may hold the lock. MLflow's own read-write
# connection rolls the journal back (or waits), so neither is a reason to refuse the store.
_SQLITE_NOT_NOW = {5: "SQLITE_BUSY", 6: "SQLITE_LOCKED", 8: "SQLITE_READONLY"}


def _check_sqlite_file(uri: str, db: Path) -> None:
    """Raise ConfigError when an existing `db` is no SQLite database (read-only, stdlib: before Ray
    starts or MLflow is imported). An empty file is one: SQLite, and MLflow, take it as a new store."""
    import sqlite3

    if not db.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)) as con:
            con.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_NOT_NOW:
            return
        raise ConfigError("mlflow.tracking_uri", uri, f"is not a usable MLflow store ({exc})") from None


def _check_db_driver(uri: str) -> None:
    """Raise ConfigError when the database driver a SQL store's URI needs is not installed (no connection made)."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine(uri)  # loads the dialect and its driver; connects only on first use
    except ModuleNotFoundError as exc:
        raise ConfigError("mlflow.tracking_uri", uri, f"needs the database driver {exc.name!r}, "
                          "which is not installed") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's own URL errors
        raise ConfigError("mlflow.tracking_uri", uri, f"is not a valid database URL ({exc})") from None


def check_writable(key: str, value: str, folder: Path) -> None:
    """Raise ConfigError unless files can be created in `folder` or its nearest existing ancestor."""
    import tempfile

    probe = next((p for p in [folder, *folder.parents] if p.exists()), None)
    try:
        if probe is None or not probe.is_dir():
            raise OSError(f"{probe} is not a folder")
        with tempfile.TemporaryFile(dir=probe):  # os.access() says yes to root even on /proc
            pass
    except OSError as exc:
        raise ConfigError(key, value, f"folder {folder} is not writable ({exc.strerror or exc})") from None



def import_mlflow(uri: str) -> None:
    """Import MLflow's client and the store module `uri` needs, creating nothing (no store, no file).

    The study driver does this while Ray starts; `make_client` then only opens the store.
    """
    with imports_without_gc():
        import mlflow.tracking  # noqa: F401

        if not uri.startswith(("http:", "https:", "file:", "databricks")):  # sqlite, postgresql, mysql, ...
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def make_client(uri: str):
    """Return an MlflowClient for `uri`, each of whose calls a Ctrl-C waits for (store_client).

    A new SQLite store is created (its schema migrated) under a lock on its folder: jobs that a Hydra
    launcher starts together (submitit, joblib) otherwise race to create the same file and one
    fails in alembic ("Online migration expected to match one row ..."). It is made under another
    name and renamed once migrated (_create_sqlite_store). A file that is no usable store is a
    ConfigError naming the URI.
    """
    with imports_without_gc():  # the first client imports MLflow and its store
        from scaling.store_client import WholeCallsClient

        db = sqlite_path(uri)
        if db is None:
            if uri.startswith(("http:", "https:")):
                # Against a server, MLflow fetches the run again each time one ends, only to print two
                # "View run/experiment at" lines: per trial, a request in the driver's writer and lines
                # amid the progress. The study prints its run's UI command once; set it to false for them.
                os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            return WholeCallsClient(tracking_uri=uri)
        import fcntl

        folder = db.resolve().parent
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)  # the lock is on the folder: no lock file left behind
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not db.exists() or db.stat().st_size == 0:  # an empty file is a new store to SQLite and MLflow
                _create_sqlite_store(db)
            return _open_sqlite_store(WholeCallsClient, uri)
        finally:
            os.close(fd)  # releases the lock


def _create_sqlite_store(db: Path) -> None:
    """Create and migrate a new SQLite store beside `db`, then rename it into place: a Ctrl-C or a kill
    mid-migration (~2 s, a few dozen alembic steps) leaves no half-migrated `db`, on which every later
    command failed ("duplicate column name"), only the temporary file, removed on the way out. A kill -9
    (or a second Ctrl-C) skips that removal: such files are removed here, under make_client's lock on
    the folder, which every creator holds, so none of them is still being written."""
    from mlflow.tracking import MlflowClient

    for stale in db.parent.glob(f".{db.name}.creating-*"):
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    # MLflow logs two INFO lines to stderr for it (and alembic its steps): noise before a study's first line
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        with interrupts.deferred():  # a Ctrl-C as a study starts is raised here, and the finally removes tmp
            MlflowClient(tracking_uri=f"sqlite:///{tmp.resolve()}")  # creates and migrates it
        os.replace(tmp, db)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _open_sqlite_store(client_class: Any, uri: str):
    """Return client_class(uri) for an existing SQLite store; a file that is not one is a ConfigError."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return client_class(tracking_uri=uri)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConfigError("mlflow.tracking_uri", uri, f"is not a usable MLflow store ({reason})") from None
