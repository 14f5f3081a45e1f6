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
        self.within: list[str | None] = []  # why the neurons within each head keep their order (heads still move)
        self.output: list[bool] = []
        self.heads: list[int | None] = []
        self._head_parent: list[int] = []
        self.parts: list[tuple[int, tuple[int, ...]]] = []  # (space cut along its neurons, its pieces in order)

    def new(self, name: str, size: int, kind: str = "hidden") -> int:
        sid = len(self._parent)
        self._parent.append(sid)
        self._head_parent.append(sid)
        self.name.append(name)
        self.size.append(int(size))
        self.kind.append(kind)
        self.fixed.append("model input" if kind == "input" else None)
        self.within.append(None)
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
        self.within[ra] = self.within[ra] or self.within[rb]
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

    def fix_within_heads(self, s: int, why: str) -> None:
        """The neurons within each head of ``s`` keep their order, but whole heads may still permute: what an op
        acting alike on every head (rotary position embeddings) leaves of the symmetry. A space that is never
        split into heads is then fixed."""
        r = self.find(s)
        self.within[r] = self.within[r] or why

    def heads_alike(self, spaces, heads: int, op: str, why: str) -> None:
        """``spaces`` are split into the same ``heads`` by an op that acts alike on every head (a slice or a concat
        of each head's dims): their heads permute together, the order within each head is fixed."""
        for s in spaces:
            self.set_heads(s, heads, op)
            self.tie_heads(spaces[0], s)
            self.fix_within_heads(s, why)

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

    def set_parts(self, s: int, parts: tuple[int, ...]) -> None:
        """Space ``s`` is the concatenation of the spaces ``parts`` (``q, k, v = qkv(x).split(d, -1)``): its
        permutation is theirs, block by block (see :meth:`resolve_parts`)."""
        self.parts.append((s, tuple(parts)))

    def resolve_parts(self) -> dict[int, tuple[int, ...]]:
        """Root -> the roots of its pieces, for spaces cut into pieces whose permutation is block-diagonal.
        A cut space that cannot be permuted (fixed, a model input or output), that was cut twice, or whose
        piece is tied back to it, fixes its pieces (and itself); repeated until nothing changes (pieces can
        be cut again)."""
        self._merge_equal_cuts()
        out: dict[int, tuple[int, ...]] = {}
        changed = True
        while changed:
            changed, out, by_root = False, {}, {}
            for s, pieces in self.parts:
                by_root.setdefault(self.find(s), []).append(pieces)
            for r, cut in by_root.items():
                pieces = tuple(self.find(p) for p in cut[0])
                free = self.fixed[r] is None and self.kind[r] == "hidden" and not self.output[r]
                if len(cut) == 1 and free and r not in pieces:
                    out[r] = pieces
                    continue
                if free:
                    self.fix(r, "cut along its neurons in two different ways" if len(cut) > 1 else
                             "a piece of it is tied back to it")
                for ps in cut:
                    for p in ps:
                        if self.fixed[self.find(p)] is None:
                            self.fix(p, f"a piece of space '{self.name[r]}', which cannot be permuted")
                            changed = True
        return out

    def _merge_equal_cuts(self) -> None:
        """Spaces tied after they were cut (the gates of an LSTM, one packed projection per time step, tied by the
        shared weight) are cut twice; cut into pieces of the same sizes, the pieces at the same place are the same
        neurons: tie them and keep one cut. Cuts of different sizes are left to :meth:`resolve_parts` (fixed)."""
        merged = True
        while merged:
            merged, first, keep = False, {}, []
            for s, pieces in self.parts:
                r = self.find(s)
                if r not in first:
                    first[r] = pieces
                    keep.append((s, pieces))
                elif [self.size[p] for p in pieces] == [self.size[p] for p in first[r]]:
                    for p0, p in zip(first[r], pieces):
                        self.tie(p0, p, f"the same cut of space '{self.name[r]}'")
                    merged = True
                else:
                    keep.append((s, pieces))
            self.parts = keep

    def roots(self) -> list[int]:
        return [s for s in range(len(self._parent)) if self.find(s) == s]
