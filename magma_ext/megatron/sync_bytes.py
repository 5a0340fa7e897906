"""Bytes a parameter sync moves, counted per rank as an all-gather counts them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SyncBytes"]


@dataclass
class SyncBytes:
    """Bytes one rank sent and received in one parameter sync, and what a dense gather moves,
    counted as an all-gather counts them: ``sent`` is this rank's own contribution (once, padding
    included), ``received`` the other ranks' contributions that arrive."""

    sent: int = 0
    received: int = 0
    dense_sent: int = 0
    dense_received: int = 0

    @classmethod
    def of_gather(cls, sent: int, received: int, dense_slot: int, size: int) -> SyncBytes:
        """A sync in which this rank contributes ``sent`` bytes and receives ``received``, in a
        group of ``size`` ranks whose dense gather moves a slot of ``dense_slot`` bytes per rank."""
        return cls(sent, received, dense_slot, (size - 1) * dense_slot)

    def __iadd__(self, other: SyncBytes) -> SyncBytes:
        self.sent += other.sent
        self.received += other.received
        self.dense_sent += other.dense_sent
        self.dense_received += other.dense_received
        return self

    def moved_densely(self) -> SyncBytes:
        """What a dense gather moves, as the bytes of a sync that ran one (``sent``, ``received``
        set to the dense figures)."""
        return SyncBytes(self.dense_sent, self.dense_received, self.dense_sent, self.dense_received)

    @property
    def fraction(self) -> float:
        """Sparse bytes over dense bytes (sent + received)."""
        dense = self.dense_sent + self.dense_received
        return (self.sent + self.received) / dense if dense else 0.0
