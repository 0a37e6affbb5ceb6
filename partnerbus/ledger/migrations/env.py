"""Alembic's environment for the ledger: configured in code, never from an alembic.ini.

`partnerbus.ledger.migrate` hands the connection in (`config.attributes["connection"]`),
already inside the transaction that holds the migration lock, so every revision runs in
that one transaction."""

from __future__ import annotations

from alembic import context

from partnerbus.ledger.migrate import configure

connection = context.config.attributes.get("connection")
if connection is None:
    msg = (
        "the ledger's migrations run through partnerbus (`partnerbus db upgrade`, "
        "`partnerbus db revision`), which hands them the database connection"
    )
    raise RuntimeError(msg)
configure(context, connection)
with context.begin_transaction():
    context.run_migrations()
