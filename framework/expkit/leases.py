"""Leases of numbered resources of one machine (process slots, GPUs) to runs.

A compute target that shares a machine between runs (`local`) takes its slots here, so that
concurrent `expkit run`s never oversubscribe it: a run that does not fit waits. Leases live in
the workspace's database (table `slots`, next to the runs they belong to) and are taken in one
write transaction, so two commands never take the same slot. A lease is held only while its
run is unfinished: when a run ends, is canceled or is marked failed because its driver died,
its slots are free at once, with no clean-up step that a crash could skip (the rows left
behind are removed by the next `take`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

# Slots of runs that are not finished: what is really held.
_HELD = (
    "SELECT kind, slot, run_id FROM slots WHERE run_id IN"
    " (SELECT id FROM runs WHERE state NOT IN ('completed', 'failed', 'canceled'))"
)
_STALE = (
    "DELETE FROM slots WHERE run_id NOT IN"
    " (SELECT id FROM runs WHERE state NOT IN ('completed', 'failed', 'canceled'))"
)


class _Database(Protocol):
    """What leases need of the run history: its connection and its write transaction."""

    @property
    def db(self) -> sqlite3.Connection: ...

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...


class Leases:
    """Every lease of one workspace: which run holds which slot of each kind."""

    def __init__(self, history: _Database) -> None:
        self._history = history

    def take(self, run_id: str, wants: dict[str, tuple[int, int]]) -> dict[str, list[int]] | None:
        """Lease to `run_id` the lowest free slots of every kind at once: `wants` is
        {kind: (count, capacity)}, e.g. {"process": (2, 8), "gpu": (1, 4)} (slots are numbered
        0..capacity-1). Returns {kind: [slot, ...]}, or None, taking nothing, when any kind
        has too few free slots."""
        chosen: dict[str, list[int]] = {}
        with self._history.transaction() as db:
            db.execute(_STALE)
            for kind, (count, capacity) in wants.items():
                rows = db.execute("SELECT slot FROM slots WHERE kind = ?", (kind,))
                taken = {slot for (slot,) in rows}
                free = [slot for slot in range(capacity) if slot not in taken]
                if len(free) < count:
                    return None  # the transaction commits nothing but the clean-up
                chosen[kind] = free[:count]
            db.executemany(
                "INSERT INTO slots (kind, slot, run_id) VALUES (?, ?, ?)",
                [(kind, slot, run_id) for kind, slots in chosen.items() for slot in slots],
            )
        return chosen

    def holders(self, kind: str) -> dict[str, int]:
        """{run id: how many slots of `kind` it holds}, for the runs that hold any."""
        rows = self._history.db.execute(
            f"SELECT run_id, COUNT(*) FROM ({_HELD}) WHERE kind = ? GROUP BY run_id", (kind,)
        )
        return dict(rows.fetchall())

    def release(self, run_id: str) -> None:
        """Give back every slot `run_id` holds (also done by the run's end, see above)."""
        with self._history.transaction() as db:
            db.execute("DELETE FROM slots WHERE run_id = ?", (run_id,))


class RunLeases:
    """The leases of one run, as a compute target sees them (`RunContext.leases`)."""

    def __init__(self, leases: Leases, run_id: str, recover: Callable[[], list[str]]) -> None:
        self._leases, self.run_id, self._recover = leases, run_id, recover

    def take(self, wants: dict[str, tuple[int, int]]) -> dict[str, list[int]] | None:
        """Lease this run the lowest free slots of every kind at once, or None (see
        `Leases.take`): {"process": (count, capacity), "gpu": (count, capacity)}."""
        return self._leases.take(self.run_id, wants)

    def holders(self, *kinds: str) -> dict[str, int]:
        """{run id: slots held} of the other runs holding slots of any of `kinds`."""
        counts: dict[str, int] = {}
        for kind in kinds:
            for run_id, count in self._leases.holders(kind).items():
                counts[run_id] = counts.get(run_id, 0) + count
        return counts

    def release(self) -> None:
        """Give back every slot this run holds."""
        self._leases.release(self.run_id)

    def recover(self) -> list[str]:
        """Mark failed the runs of this machine whose driver process died (freeing their
        slots), as the next command would; returns their ids. For a target waiting on slots
        that a crashed run still seems to hold."""
        return self._recover()
