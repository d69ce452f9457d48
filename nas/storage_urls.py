"""Storage URLs: telling a database URL from a journal path, parsing, masking, checking.

`nas.storage` opens the study storage a URL names; this module is what it and the CLI need to
know about the URL itself: whether a `storage` setting is a URL at all (`is_url`, the one such
test in the house), its SQLAlchemy form with the database driver made explicit (`parse_url`),
the printable form with any password shown as `***` (`masked`), and whether a SQLite database a
reader expects actually exists (`check_database_exists`). No Ray; SQLAlchemy is imported only
when a URL is parsed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nas.settings import SettingError

MASK = "***"

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: Any) -> bool:
    """True for a database URL (`postgresql://...`, `sqlite:///x.db`), False for a journal file
    path, None or "". The one test of "is this storage a URL" in the house."""
    return isinstance(value, str) and bool(_URL.match(value.strip()))


def check_database_exists(url: str, *, source: str = "`storage`") -> None:
    """`SettingError` (of `storage`) if `url` is a SQLite URL whose database file does not exist
    (or an in-memory one): readers of a finished search must not create an empty database where they
    expected the study. Other databases live on a server and are checked when opened. `source` says
    where the URL came from: the `storage` setting, or e.g. a run's run.json."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return
    shown = masked(parsed) if parsed.password else url
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise SettingError("storage", f"{source} {shown} is an in-memory SQLite database, which"
                                      " holds no study. Use the URL of the search's database"
                                      " file, e.g. sqlite:///path/to/study.db.")
    path = Path(database.removeprefix("file:").split("?", 1)[0]).expanduser()
    if not path.is_file():
        raise SettingError("storage", f"{source} {shown} names the database file"
                                      f" {str(path)!r}, which does not exist (relative paths"
                                      " count from the current folder); the study is not there"
                                      " and nothing was created. Check the path"
                                      + (", or leave `storage` unset to read the run's own"
                                         " storage." if source == "`storage`" else "."))


def parse_url(url: str):
    import sqlalchemy.engine
    import sqlalchemy.exc

    if not isinstance(url, str) or not url.strip():
        raise SettingError("storage", f"the storage URL must be a non-empty string, but got"
                                      f" {url!r}. Use e.g. `storage`"
                                      " postgresql://user@host:5432/nas, or leave `storage`"
                                      " unset for the run's journal file.")
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        raise SettingError("storage", f"the storage URL {url!r} is not a database URL ({e})."
                                      " Write dialect://user@host:port/database, e.g."
                                      " postgresql://nas@db:5432/nas or sqlite:///study.db, or"
                                      " leave `storage` unset for the run's journal file.")\
            from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername=f"postgresql+{_postgres_driver()}")
    return parsed


def _postgres_driver() -> str:
    """SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3; use psycopg2 when only it is
    installed (this project depends on psycopg2-binary)."""
    import importlib.util

    return "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"


def masked(parsed) -> str:
    """The URL with its password (and any `password` query parameter) shown as `***`."""
    secret = [k for k in parsed.query if "password" in k.lower()]
    if secret:
        parsed = parsed.update_query_dict({k: MASK for k in secret})
    return parsed.render_as_string(hide_password=True)



def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

