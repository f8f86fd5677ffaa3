"""The part spec: which pieces of a model a slice holds.

Grammar (whitespace-separated tokens, half-open layer ranges, global layer indices):
  ``f``            the full model (embeddings, every layer, final norm and head)
  ``b 0-16``       embeddings ("begin") and layers 0..15
  ``16-32 e``      layers 16..31, final norm and head ("end")
  ``0-5 30-35``    several ranges; ``7`` alone is the single layer 7
"""

from __future__ import annotations

from dataclasses import dataclass

from layercake.errors import LayercakeError


@dataclass(frozen=True)
class Parts:
    """A parsed part spec: ``layers`` is the sorted tuple of global layer indices held."""

    embed: bool
    layers: tuple[int, ...]
    head: bool

    @classmethod
    def full(cls, num_layers: int) -> Parts:
        return cls(True, tuple(range(num_layers)), True)

    def ranges(self) -> list[tuple[int, int]]:
        """The held layers as maximal half-open ranges."""
        out: list[tuple[int, int]] = []
        for i in self.layers:
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
        return out

    def __str__(self) -> str:
        words = (["b"] if self.embed else []) + [f"{a}-{b}" for a, b in self.ranges()]
        return " ".join(words + (["e"] if self.head else []))


def parse_parts(spec: str, num_layers: int) -> Parts:
    """Parse a part spec against a model of ``num_layers`` layers; explain any mistake."""
    words = spec.replace(",", " ").split()
    if not words:
        raise LayercakeError("empty part spec: use 'f', or e.g. 'b 0-16', '16-32 e', '0-5 30-35'")
    if words == ["f"]:
        return Parts.full(num_layers)
    embed = head = False
    layers: list[int] = []
    for w in words:
        if w == "b":
            embed = True
        elif w == "e":
            head = True
        elif w == "f":
            raise LayercakeError(
                f"part spec {spec!r}: 'f' (full model) cannot be combined with others"
            )
        else:
            lo, sep, hi = w.partition("-")
            try:
                a, b = int(lo), int(hi) if sep else int(lo) + 1
            except ValueError:
                raise LayercakeError(
                    f"part spec {spec!r}: {w!r} is not 'b', 'e', 'f', a layer or a range like 0-16"
                ) from None
            if not 0 <= a < b <= num_layers:
                raise LayercakeError(
                    f"part spec {spec!r}: range {w!r} is empty or outside the model's "
                    f"layers 0-{num_layers} (half-open)"
                )
            overlap = set(range(a, b)) & set(layers)
            if overlap:
                raise LayercakeError(f"part spec {spec!r}: layer {min(overlap)} is listed twice")
            layers.extend(range(a, b))
    return Parts(embed, tuple(sorted(layers)), head)
