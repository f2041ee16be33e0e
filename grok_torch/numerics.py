"""Numerics modes: named ways for one Grok model to compute, chosen at build or load (`numerics=`).

A mode is data (a frozen `Numerics`), read by the modules at call time; switching it never touches
a weight. "upstream" reproduces every cast of upstream's JAX forward on the CPU (the parity harness
and the golden tests use it). Other modes name what they change, and the README states how far
each one is from upstream, measured.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Numerics", "PRESETS", "resolve"]


@dataclass(frozen=True)
class Numerics:
    """How the forward computes. Each field is one decision, with upstream's choice as its default."""

    name: str
    summary: str


UPSTREAM = Numerics(
    name="upstream",
    summary="every cast as upstream's JAX forward (bit-exact to it on the CPU)",
)

PRESETS: dict[str, Numerics] = {n.name: n for n in (UPSTREAM,)}


def resolve(numerics: str | Numerics | None, default: str = "upstream") -> Numerics:
    """A preset by name (None: `default`), or a Numerics as given; ValueError naming the choices."""
    if numerics is None:
        numerics = default
    if isinstance(numerics, Numerics):
        return numerics
    try:
        return PRESETS[numerics]
    except KeyError:
        raise ValueError(f"numerics must be one of {', '.join(PRESETS)}, got {numerics!r}") from None
