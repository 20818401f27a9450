"""Schema migrations (Alembic), run by ``cxr-worker db upgrade`` and at ``serve`` start-up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, exc, make_url, text

from cxr_worker.errors import CxrWorkerError, StartupError

MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key held while migrating ("cxrw" as an integer)
MIGRATION_LOCK = 0x63787277


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; returns the revision now in place."""
    cfg = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # several processes starting at once (scale-out) migrate one at a time; the
            # lock ends with this transaction
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(engine)


def downgrade(engine: Engine, revision: str) -> str | None:
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    return current_revision(engine)


def not_created(url: str) -> bool:
    """Whether ``url`` is an embedded SQLite worklist whose file does not exist yet (a server
    database always exists, as far as the URL can tell)."""
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and (
        not parsed.database or parsed.database == ":memory:"
        or not Path(parsed.database).is_file())


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of an SQLite file URL (nothing for other databases)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database \
            and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def masked(url: str) -> str:
    """The URL with its password hidden (``***``), as it may be shown; the text itself when it
    is not a URL."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return url


_DRIVER_ADVICE = ("use postgresql+psycopg://user:password@host/db (pip install "
                  "'cxr-worker[postgres]'), or leave it empty for SQLite under storage.data_dir")


@contextmanager
def named_errors(url: str) -> Iterator[None]:
    """Turn the ways a database URL fails at start-up into one :class:`StartupError` naming
    ``database.url`` (password masked) and what to do."""
    shown = masked(url)
    try:
        yield
    except exc.NoSuchModuleError as e:  # e.g. postgres:// (SQLAlchemy wants postgresql://)
        scheme = url.split(":", 1)[0]
        raise StartupError(f"database.url {shown}: SQLAlchemy has no dialect for {scheme}://: "
                           f"{_DRIVER_ADVICE}") from e
    except exc.ArgumentError as e:
        raise StartupError(f"database.url {shown}: not a database URL ({e}): "
                           f"{_DRIVER_ADVICE}") from e
    except ModuleNotFoundError as e:
        raise StartupError(f"database.url {shown}: driver module {e.name!r} is not installed: "
                           f"{_DRIVER_ADVICE}") from e
    except (exc.OperationalError, exc.InterfaceError) as e:
        reason = " ".join(str(e.orig or e).split())  # the driver's words, on one line
        if url.startswith("sqlite"):
            raise StartupError(f"database.url {shown}: cannot open ({reason}): check that its "
                               "folder exists and the worker's user can write it") from e
        raise StartupError(f"database.url {shown}: cannot connect ({reason}): check that the "
                           "database server runs and the host, port, user and password",
                           transient=True) from e
    except OSError as e:  # the folder of an SQLite file
        raise StartupError(f"database.url {shown}: cannot create its folder {e.filename} "
                           f"({e.strerror}): use a folder the worker can create and write") from e


def open_database(url: str, migrate: bool = False) -> Engine:
    """The worklist engine, ready to use.

    The embedded SQLite file (and its folder) is created and migrated on first use; a server
    database is migrated only when ``migrate`` (``serve`` and ``db upgrade`` do), and otherwise
    must be at the head revision already. A URL that cannot be used raises
    :class:`StartupError` (:func:`named_errors`).
    """
    with named_errors(url):
        return _open_database(url, migrate)


def _open_database(url: str, migrate: bool) -> Engine:
    from cxr_worker.worklist.queue import make_engine

    ensure_sqlite_folder(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = make_engine(url)
        upgrade(engine)
        return engine
    engine = make_engine(url)
    if migrate:
        upgrade(engine)
        return engine
    current = current_revision(engine)
    if current != head_revision():
        raise CxrWorkerError(f"database schema at revision {current}, expected "
                             f"{head_revision()}: run 'cxr-worker db upgrade'")
    return engine
