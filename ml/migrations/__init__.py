"""driftloop's schema migrations (Alembic), configured in code: no ``alembic.ini``.

:func:`ml.db.migrate` runs them (``ml.db.get_engine`` does, once per process, under the stores'
cross-process lock). The version lives in its own table, :data:`VERSION_TABLE`, so MLflow's
``alembic_version`` can share the database. How to add a revision: ``docs/migrations.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection

SCRIPT_LOCATION = Path(__file__).resolve().parent
VERSION_TABLE = "driftloop_alembic_version"
# The schema driftloop had before it had migrations; an unversioned database made by an older
# driftloop is stamped at this revision (ml.db).
BASELINE = "0001"


def alembic_config(url: str, connection: Connection | None = None) -> Config:
    """An Alembic config for driftloop's revisions on ``url``.

    With ``connection``, ``env.py`` runs on it (and in its transaction) instead of opening one.
    New revision files are named ``<rev>_<slug>.py`` (pass ``rev_id="0003"`` and so on).
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser interpolation
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg
