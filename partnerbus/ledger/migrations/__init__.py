"""The ledger's Alembic migrations (env.py, versions/); run through `partnerbus.ledger.migrate`."""
