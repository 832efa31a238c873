"""What making a group of rules exactly a given list changes, as columns. Pure: no I/O.

A group is a named set's rules, or every rule. The new list is matched against the table by
(prefix, proto, dport), the identity of a rule:
  - kept:    in both, with the same action, comment and set: nothing happens to it;
  - changed: in both with another action, comment or set: it becomes a new rule (new id and
             counter slot) whose verdict replaces the old one in place, in the same entry;
  - added:   only in the new list;
  - removed: only in the group.
A match that exists outside the group is a conflict: replacing one set never takes or
changes another set's rules (nor rules in no set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xdpfw.errors import ConflictError
from xdpfw.rules.table import NewRules, RuleTable


@dataclass(frozen=True)
class RuleDiff:
    """Rows of the table and indexes into the new list (NewRules), each ascending."""

    added: np.ndarray  # new-list indexes
    removed: np.ndarray  # rows
    kept: np.ndarray  # rows
    changed: np.ndarray  # rows (the old rules)
    changed_new: np.ndarray  # new-list indexes of the same matches (so not ascending)

    @property
    def gone_rows(self) -> np.ndarray:
        """Rows whose rules leave the table: the removed and the old side of the changed."""
        return np.sort(np.concatenate([self.removed, self.changed]))

    @property
    def entering(self) -> np.ndarray:
        """New-list indexes of the rules that enter the table, in list order."""
        return np.sort(np.concatenate([self.added, self.changed_new]))

    def __bool__(self) -> bool:
        return bool(len(self.added) or len(self.removed) or len(self.changed))


def diff_rules(table: RuleTable, group: np.ndarray, new: NewRules,
               group_name: str | None) -> RuleDiff:
    """group: the living rows the new list replaces. group_name: how a conflict names the
    group (a set's name; None: every rule, where no conflict can arise)."""
    repeat = new.first_repeat()
    if repeat is not None:
        raise ConflictError(f"{new.describe(repeat)} appears twice in this request")
    p = new.prefixes
    rows = table.find_many(p.family, p.hi, p.lo, p.plen, new.proto, new.dport)
    in_group = np.zeros(table.n + 1, dtype=bool)  # the last one stands for "not found"
    in_group[group] = True
    found = rows >= 0
    outside = found & ~in_group[np.where(found, rows, table.n)]
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        other = table.rule(int(rows[i]))
        where = f"set {other.rule_set!r}" if other.rule_set else "no set"
        raise ConflictError(
            f"{new.describe(i)} is rule {other.id}, in {where}: set {group_name!r} cannot "
            "take it over (delete it there first, or put the rule in one set only)")
    both = np.flatnonzero(found)
    old = rows[both]
    c = table.col
    same = ((c["action"][old] == new.action[both]) & (c["comment"][old] == new.comment[both])
            & (c["set"][old] == new.rule_set[both]))
    in_new = np.zeros(table.n, dtype=bool)
    in_new[old] = True
    order = np.argsort(old[~same])
    return RuleDiff(
        added=np.flatnonzero(~found),
        removed=group[~in_new[group]],
        kept=np.sort(old[same]),
        changed=old[~same][order],
        changed_new=both[~same][order],
    )
