"""Where a --tune study lives: Optuna's RDB storage at a URL, opened, checked and shown without its password."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from kd.config import Config
from kd.errors import KDError

STUDY_FILE = "study.db"
HEARTBEAT_S = 30  # a running trial records a heartbeat this often; silent for GRACE_S, it is failed as stale
GRACE_S = 600
SCHEMA_RACE_TRIES = 3


def storage_url(c: Config, folder: Path) -> str:
    """The study's storage: --tune_storage, else an SQLite file in the experiment's ``tune/`` folder."""
    return c.tune_storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url``, with heartbeats, so a trial whose machine died is failed in the end.

    SQLite waits for a lock (other processes' trials) rather than failing. Processes creating one new
    database together race to write its schema version; the loser opens it again once the winner has.
    """
    try:
        for _ in range(SCHEMA_RACE_TRIES - 1):
            try:
                return _rdb_storage(url)
            except IntegrityError:
                time.sleep(1)
        return _rdb_storage(url)
    except Exception as exc:  # SQLAlchemy's and the database drivers' errors have no common base
        raise KDError(f"--tune_storage {shown_url(url)}: cannot open the study: {one_line(exc)}") from None


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """One attempt at opening the storage, with the heartbeats and the SQLite lock wait."""
    engine = {"connect_args": {"timeout": 300}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # Optuna marks heartbeats "experimental"; kd relies on them knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S)


def shown_url(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show it as given
        return url


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def check_storage(url: str) -> None:
    """Connect to a --tune_storage database once (an SQLite file's folder must exist; nothing is created)."""
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            folder = Path(parsed.database or "").expanduser().resolve().parent
            if not parsed.database or not folder.is_dir():
                raise FileNotFoundError(f"no folder {folder} for the SQLite file")
            return
        with create_engine(url).connect():
            pass
    except Exception as exc:  # a bad URL, a missing driver, a refused connection
        raise KDError(f"--tune_storage {shown_url(url)}: cannot reach the study storage: {one_line(exc)}") from None
