"""Helpers shared by the rule modules."""

from __future__ import annotations

from ..placements import Placement, Replicate


def replicate_partials(placements: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """The placements with every pending reduction resolved (Partial -> Replicate)."""
    return tuple(Replicate() if p.is_partial() else p for p in placements)
