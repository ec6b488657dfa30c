"""Union-find over tensor *axis atoms*, with layouts that survive reshapes and concatenation.

Every axis of every tensor in a traced graph is described by a *layout term*:

- ``("a", id)``: one atom, an indivisible set of units that one permutation acts on;
- ``("p", (t1, t2, ...))``: a row-major product (what ``flatten`` makes of (C, H, W));
- ``("s", (t1, t2, ...))``: a concatenation (what ``cat`` makes of channel blocks).

Op rules declare that two axes must carry the same permutation by unifying their terms.
Unifying a coarse atom with a finer layout *splits* the atom (a Linear's input axis of size
C*H*W becomes C x H x W after a flatten), so one permutation of the conv channels acts on
blocks of the flattened features. Atoms that cannot be aligned are frozen, with a reason:
freezing only ever removes symmetries, so it can never make a spec wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Term = tuple


def atom(i: int) -> Term:
    return ("a", i)


def prod(*terms: Term) -> Term:
    return terms[0] if len(terms) == 1 else ("p", tuple(terms))


def concat(*terms: Term) -> Term:
    return terms[0] if len(terms) == 1 else ("s", tuple(terms))


@dataclass
class AtomTable:
    """Atoms with sizes, a union-find over them, and per-class facts (frozen, blocks, names)."""

    size: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    frozen: dict[int, list[str]] = field(default_factory=dict)
    blocks: dict[int, set[int]] = field(default_factory=dict)
    children: dict[int, tuple[str, list[int]]] = field(default_factory=dict)
    hint: dict[int, tuple[int, str]] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)  # atoms contracted by a matmul

    def new(
        self, size: int, frozen: str | None = None, hint: str | None = None, order: int = 1 << 30
    ) -> int:
        i = len(self.size)
        self.size.append(int(size))
        self.parent.append(i)
        if frozen:
            self.frozen[i] = [frozen]
        if hint:
            self.hint[i] = (order, hint)
        return i

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise AssertionError(f"union of atoms of sizes {self.size[ra]} and {self.size[rb]}")
        if ra in self.children or rb in self.children:
            raise AssertionError("union of an atom that was already split")
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.frozen:
            reasons = self.frozen.setdefault(ra, [])
            reasons.extend(r for r in self.frozen.pop(rb) if r not in reasons)
        if rb in self.blocks:
            self.blocks.setdefault(ra, set()).update(self.blocks.pop(rb))
        if rb in self.hint:
            hb = self.hint.pop(rb)
            if ra not in self.hint or hb[0] < self.hint[ra][0]:
                self.hint[ra] = hb

    def freeze(self, i: int, reason: str) -> None:
        r = self.find(i)
        if r in self.children:
            for c in self.children[r][1]:
                self.freeze(c, reason)
            return
        reasons = self.frozen.setdefault(r, [])
        if reason not in reasons:
            reasons.append(reason)

    def add_blocks(self, i: int, num_blocks: int) -> None:
        self.blocks.setdefault(self.find(i), set()).add(int(num_blocks))

    def split(self, i: int, kind: str, sizes: list[int]) -> list[int]:
        """Replace a leaf class by a product ('p') or concatenation ('s') of new atoms."""
        r = self.find(i)
        assert r not in self.children, "split of an already split atom"
        total = math.prod(sizes) if kind == "p" else sum(sizes)
        assert total == self.size[r], (kind, sizes, self.size[r])
        order, base = self.hint.get(r, (1 << 30, ""))
        kids = [
            self.new(s, hint=f"{base}[{k}]" if base else None, order=order)
            for k, s in enumerate(sizes)
        ]
        for reason in self.frozen.get(r, []):
            for c in kids:
                self.freeze(c, reason)
        if self.blocks.get(r):
            for c in kids:
                self.freeze(c, "a GroupNorm-blocked axis was reshaped")
        self.children[r] = (kind, kids)
        return kids

    # ---- layouts -----------------------------------------------------------------------

    def leaves(self, term: Term) -> list[int]:
        """All leaf atoms reachable from a term (used to freeze whatever a term touches)."""
        if term[0] == "a":
            r = self.find(term[1])
            if r in self.children:
                return [x for c in self.children[r][1] for x in self.leaves(atom(c))]
            return [r]
        return [x for t in term[1] for x in self.leaves(t)]

    def term_size(self, term: Term) -> int:
        if term[0] == "a":
            return self.size[self.find(term[1])]
        sizes = [self.term_size(t) for t in term[1]]
        return math.prod(sizes) if term[0] == "p" else sum(sizes)

    def normalize(self, term: Term, opaque: bool = False) -> list[list[int]] | None:
        """Layout as a concatenation of row-major products of leaf atoms.

        Size-1 atoms are dropped from products (an empty product is a segment of size 1).
        Returns None when the layout is not of that form (a concatenation nested at a minor
        position of a product), which callers treat as 'cannot align'. With ``opaque`` (for
        the final spec, once nothing changes any more), such a minor concatenation made only
        of frozen atoms becomes one frozen atom: the head dims of a RoPE query, split in
        halves by rotate_half and frozen, still let the heads permute.
        """
        if term[0] == "a":
            r = self.find(term[1])
            if r in self.children:
                kind, kids = self.children[r]
                return self.normalize(
                    ("p" if kind == "p" else "s", tuple(atom(c) for c in kids)), opaque
                )
            return [[r]] if self.size[r] != 1 else [[]]
        parts = [self.normalize(t, opaque) for t in term[1]]
        if opaque and term[0] == "p":
            parts = [
                self._opaque(p) if p is not None and len(p) > 1 and k > 0 else p
                for k, p in enumerate(parts)
            ]
        if any(p is None for p in parts):
            return None
        if term[0] == "s":
            return [seg for p in parts for seg in p]
        result: list[list[int]] = [[]]
        for p in parts:
            if sum(self._seg_size(s) for s in p) == 1:
                continue
            if len(p) == 1:
                result = [seg + p[0] for seg in result]
            elif len(result) == 1 and not result[0]:
                result = [list(seg) for seg in p]
            else:
                return None
        return result

    def _opaque(self, segs: list[list[int]]) -> list[list[int]] | None:
        if any(self.size[a] > 1 and not self.frozen.get(a) for seg in segs for a in seg):
            return None
        reasons = sorted({r for seg in segs for a in seg for r in self.frozen.get(a, [])})
        blob = self.new(sum(self._seg_size(s) for s in segs), frozen="; ".join(reasons))
        return [[blob]]

    def _seg_size(self, seg: list[int]) -> int:
        return math.prod(self.size[a] for a in seg)

    def unify(self, t1: Term, t2: Term, reason: str) -> bool:
        """Declare that two axes carry one permutation. Freezes both on failure."""
        for _ in range(10_000):
            s1, s2 = self.normalize(t1), self.normalize(t2)
            if s1 is None or s2 is None:
                break
            if sum(map(self._seg_size, s1)) != sum(map(self._seg_size, s2)):
                break
            step = self._sum_step(s1, s2)
            if step is False:
                break
            if step:
                continue
            step = self._prod_step(s1, s2)
            if step is False:
                break
            if step:
                continue
            for a, b in zip(s1, s2, strict=True):
                for x, y in zip(a, b, strict=True):
                    self.union(x, y)
            return True
        for a in self.leaves(t1) + self.leaves(t2):
            self.freeze(a, reason)
        return False

    def _sum_step(self, s1: list[list[int]], s2: list[list[int]]) -> bool | None:
        """Split one atom so both layouts have the same segment boundaries (None: aligned)."""
        b1, b2 = _boundaries(s1, self._seg_size), _boundaries(s2, self._seg_size)
        if b1 == b2:
            return None
        cut = min(set(b1) ^ set(b2))
        segs, bounds = (s1, b1) if cut not in b1 else (s2, b2)
        k = next(
            j for j in range(len(segs)) if bounds[j] < cut < bounds[j] + self._seg_size(segs[j])
        )
        seg, offset = segs[k], cut - bounds[k]
        if not seg:
            return False
        inner = math.prod(self.size[a] for a in seg[1:])
        if offset % inner:
            return False
        major = offset // inner
        self.split(seg[0], "s", [major, self.size[seg[0]] - major])
        return True

    def _prod_step(self, s1: list[list[int]], s2: list[list[int]]) -> bool | None:
        """Split one atom so paired segments have factors of equal sizes (None: aligned)."""
        for a, b in zip(s1, s2, strict=True):
            for x, y in zip(a, b, strict=False):
                sx, sy = self.size[x], self.size[y]
                if sx == sy:
                    continue
                big, small = (x, sy) if sx > sy else (y, sx)
                if self.size[big] % small:
                    return False
                self.split(big, "p", [small, self.size[big] // small])
                return True
            if len(a) != len(b):
                return False
        return None


def _boundaries(segs: list[list[int]], seg_size) -> list[int]:
    out, pos = [], 0
    for s in segs:
        out.append(pos)
        pos += seg_size(s)
    return out
