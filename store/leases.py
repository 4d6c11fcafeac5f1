"""Named leases in the database: one holder at a time across processes and nodes (the retrain job's lock)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.schema import LeaseRow, aware, utcnow


class Leases:
    """Mixed into Store: needs its `engine` and `_committed`."""

    # -- leases --------------------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> str | None:
        """Claim `name` for `ttl_s` seconds; None when it is ours now, else who holds it.

        Renew by acquiring again before it expires; an expired claim is anyone's (its holder died).
        """
        def claim(session: Session) -> str | None:
            now = utcnow()
            row = session.get(LeaseRow, name, with_for_update=True)
            if row is not None and row.holder != holder and aware(row.expires_at) > now:
                return row.holder
            if row is None:
                session.add(LeaseRow(name=name, holder=holder, expires_at=now + timedelta(seconds=ttl_s)))
            else:
                row.holder, row.expires_at = holder, now + timedelta(seconds=ttl_s)
            return None

        try:
            return self._committed(claim)
        except IntegrityError:  # another process inserted the first claim at the same moment
            return self.lease_holder(name) or self.acquire_lease(name, holder, ttl_s)

    def lease_holder(self, name: str) -> str | None:
        """Who holds an unexpired claim on `name`, or None."""
        with Session(self.engine) as session:
            row = session.get(LeaseRow, name)
            return row.holder if row is not None and aware(row.expires_at) > utcnow() else None

    def release_lease(self, name: str, holder: str) -> None:
        """Give up a claim (only its holder's)."""
        self._committed(lambda session: session.execute(
            delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder)))

