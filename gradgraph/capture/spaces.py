"""Neuron spaces and the constraints between them, as the tracer discovers them.

A :class:`SpaceTable` is a union-find over spaces: tying two spaces (a residual addition, queries and keys
of one attention) makes them one space with one permutation; fixing a space (a model input or output, a
per-neuron constant, an op the tracer cannot follow) keeps it unpermuted, and the first reason is kept.
"""
from __future__ import annotations

__all__ = ["SpaceTable"]


class SpaceTable:
    """Union-find over neuron spaces.

    A space is a set of neurons that one permutation acts on. Tied spaces (a residual addition ties the
    stream to every block output) share their permutation. Attention spaces are split into ``heads``
    blocks; spaces in one head group share the permutation of the heads (q, k, v, attention output).
    """

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.name: list[str] = []
        self.size: list[int] = []
        self.kind: list[str] = []  # "hidden" | "input"
        self.fixed: list[str | None] = []  # why the space cannot be permuted, or None
        self.output: list[bool] = []
        self.heads: list[int | None] = []
        self._head_parent: list[int] = []

    def new(self, name: str, size: int, kind: str = "hidden") -> int:
        sid = len(self._parent)
        self._parent.append(sid)
        self._head_parent.append(sid)
        self.name.append(name)
        self.size.append(int(size))
        self.kind.append(kind)
        self.fixed.append("model input" if kind == "input" else None)
        self.output.append(False)
        self.heads.append(None)
        return sid

    def find(self, s: int) -> int:
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def head_group(self, s: int) -> int:
        h = self.find(s)
        while self._head_parent[h] != h:
            self._head_parent[h] = self._head_parent[self._head_parent[h]]
            h = self._head_parent[h]
        return h

    def tie(self, a: int, b: int, why: str) -> int:
        """Neurons of ``a`` and ``b`` are the same neurons (same permutation)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ha, hb = self.head_group(ra), self.head_group(rb)
        if ra > rb:  # keep the older space as representative: its name is the canonical key
            ra, rb, ha, hb = rb, ra, hb, ha
        self._parent[rb] = ra
        if ha != hb:
            self._head_parent[max(ha, hb)] = min(ha, hb)
        if self.size[ra] != self.size[rb]:
            self.fixed[ra] = self.fixed[ra] or f"tied to a space of another size by {why}"
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        self.output[ra] = self.output[ra] or self.output[rb]
        if self.kind[rb] == "input":
            self.kind[ra] = "input"
        ha_, hb_ = self.heads[ra], self.heads[rb]
        if ha_ is not None and hb_ is not None and ha_ != hb_:
            self.fixed[ra] = self.fixed[ra] or f"conflicting head splits ({ha_} vs {hb_}) tied by {why}"
        self.heads[ra] = ha_ if ha_ is not None else hb_
        return ra

    def fix(self, s: int, why: str) -> None:
        r = self.find(s)
        self.fixed[r] = self.fixed[r] or why

    def mark_output(self, s: int) -> None:
        r = self.find(s)
        self.output[r] = True
        self.fixed[r] = self.fixed[r] or "model output"

    def set_heads(self, s: int, heads: int, why: str) -> None:
        r = self.find(s)
        if self.heads[r] is None:
            if self.size[r] % heads:
                self.fix(r, f"{why}: {heads} heads do not divide {self.size[r]} neurons")
            self.heads[r] = heads
        elif self.heads[r] != heads:
            self.fix(r, f"conflicting head splits ({self.heads[r]} vs {heads}) by {why}")

    def tie_heads(self, a: int, b: int) -> None:
        """``a`` and ``b`` are split into the same heads: permuting heads must act on both."""
        ha, hb = self.head_group(a), self.head_group(b)
        if ha != hb:
            self._head_parent[max(ha, hb)] = min(ha, hb)

    def roots(self) -> list[int]:
        return [s for s in range(len(self._parent)) if self.find(s) == s]
