"""Compile rules into the data plane's map entries, incrementally. Pure Python: no BCC.

Semantics (the same a person reads off the rule list):
  among the rules whose prefix contains the source address and whose proto/port match,
  the one with the longest prefix wins; on a tie, the most specific match
  (proto+port, then proto, then any) wins.

The kernel does one LPM lookup, and a second one only when the matched prefix has port rules.
So each LPM entry carries a *resolved* verdict:
  - a prefix with an "any" rule needs nothing from its ancestors: any packet that reaches it
    is decided there, at the longest matching prefix;
  - a prefix with only proto/port rules ("port-only") inherits: the nearest ancestor's "any"
    rule, and the port rules of ancestors up to that one.
Hence a change at prefix P affects P itself and the port-only prefixes inside P, and nothing
else: adding one rule to a million costs a handful of dictionary lookups.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from xdpfw.dataplane.abi import ACT_DROP, ACT_NONE, ACT_PASS, NO_PORT_SET, NO_RULE
from xdpfw.rules.model import Action, Prefix, Rule, ip_proto

ACTION_CODE = {Action.PASS: ACT_PASS, Action.DROP: ACT_DROP}

PortMatch = tuple[int, int]  # (ip proto, dport); dport 0: any port of that proto
Verdict = tuple[int, int]  # (rule slot, action code)
PrefixValue = tuple[int, int, int]  # (rule slot, action code, port set)
PortKey = tuple[int, int, int]  # (port set, ip proto, dport)


@dataclass
class Node:
    any: Rule | None = None
    ports: dict[PortMatch, Rule] = field(default_factory=dict)

    def empty(self) -> bool:
        return self.any is None and not self.ports


@dataclass
class Changes:
    """Map writes that take the data plane from the previous compiled state to the new one."""

    prefixes: dict[Prefix, PrefixValue] = field(default_factory=dict)
    deleted_prefixes: list[Prefix] = field(default_factory=list)
    ports: dict[PortKey, Verdict] = field(default_factory=dict)
    deleted_ports: list[PortKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefixes or self.deleted_prefixes or self.ports or self.deleted_ports)


def _verdict(rule: Rule) -> Verdict:
    return (rule.slot, ACTION_CODE[rule.action])


def port_match(rule: Rule) -> PortMatch | None:
    if rule.proto is None:
        return None
    return (ip_proto(rule.proto, rule.prefix.family), rule.dport or 0)


class RuleIndex:
    """The rules, indexed by prefix, and what is currently compiled into the maps."""

    def __init__(self) -> None:
        self.nodes: dict[Prefix, Node] = {}
        self.port_only: set[Prefix] = set()
        self.by_match: dict[tuple, Rule] = {}
        # Compiled state: what the maps hold now.
        self.prefix_values: dict[Prefix, PrefixValue] = {}
        self.port_entries: dict[Prefix, dict[PortMatch, Verdict]] = {}
        self.port_set_ids: dict[Prefix, int] = {}
        self._free_sets: list[int] = []
        self._next_set = 1

    def __len__(self) -> int:
        return len(self.by_match)

    def find(self, prefix: Prefix, proto, dport) -> Rule | None:
        return self.by_match.get((prefix, proto, dport))

    # -- mutation ---------------------------------------------------------------------------

    def add(self, rules: Iterable[Rule]) -> Changes:
        touched: set[Prefix] = set()
        for rule in rules:
            node = self.nodes.get(rule.prefix)
            if node is None:
                node = self.nodes[rule.prefix] = Node()
            pm = port_match(rule)
            if pm is None:
                node.any = rule
            else:
                node.ports[pm] = rule
            self.by_match[rule.match_key] = rule
            self._classify(rule.prefix, node)
            touched.add(rule.prefix)
        return self._recompile(touched)

    def remove(self, rules: Iterable[Rule]) -> Changes:
        touched: set[Prefix] = set()
        for rule in rules:
            node = self.nodes[rule.prefix]
            pm = port_match(rule)
            if pm is None:
                node.any = None
            else:
                del node.ports[pm]
            del self.by_match[rule.match_key]
            if node.empty():
                del self.nodes[rule.prefix]
                self.port_only.discard(rule.prefix)
            else:
                self._classify(rule.prefix, node)
            touched.add(rule.prefix)
        return self._recompile(touched)

    def _classify(self, prefix: Prefix, node: Node) -> None:
        if node.any is None and node.ports:
            self.port_only.add(prefix)
        else:
            self.port_only.discard(prefix)

    # -- compilation ------------------------------------------------------------------------

    def _affected(self, touched: set[Prefix]) -> set[Prefix]:
        affected = set(touched)
        if self.port_only:
            for p in touched:
                affected.update(q for q in self.port_only if p.contains(q))
        return affected

    def _chain(self, prefix: Prefix, node: Node) -> list[Node]:
        """The nodes whose rules can decide for packets that land on `prefix`, longest first."""
        chain = [node]
        if node.any is None:
            for parent in prefix.parent_candidates():
                n = self.nodes.get(parent)
                if n is not None:
                    chain.append(n)
                    if n.any is not None:
                        break
        return chain

    def resolve(self, prefix: Prefix) -> tuple[Verdict | None, dict[PortMatch, Verdict]]:
        """The fallback verdict of `prefix` and its port table, per the semantics above."""
        node = self.nodes[prefix]
        if not node.ports and node.any is not None:
            return _verdict(node.any), {}  # the common case: a plain prefix rule
        chain = self._chain(prefix, node)
        fallback = next((n.any for n in chain if n.any is not None), None)
        keys: set[PortMatch] = set()
        for n in chain:
            keys.update(n.ports)
        table: dict[PortMatch, Verdict] = {}
        for proto, dport in keys:
            winner = None
            for n in chain:
                winner = (
                    n.ports.get((proto, dport)) or (dport and n.ports.get((proto, 0))) or n.any
                )
                if winner is not None:
                    break
            # Omitted entries fall through to the same fallback in the kernel.
            if winner is not None and winner is not fallback:
                table[(proto, dport)] = _verdict(winner)
        return (_verdict(fallback) if fallback else None), table

    def _recompile(self, touched: set[Prefix]) -> Changes:
        changes = Changes()
        self._freed: list[int] = []
        for prefix in self._affected(touched):
            if prefix not in self.nodes:
                if self.prefix_values.pop(prefix, None) is not None:
                    changes.deleted_prefixes.append(prefix)
                self._set_ports(prefix, {}, changes)
                continue
            fallback, table = self.resolve(prefix)
            port_set = self._set_ports(prefix, table, changes)
            slot, action = fallback if fallback else (NO_RULE, ACT_NONE)
            value = (slot, action, port_set)
            if self.prefix_values.get(prefix) != value:
                self.prefix_values[prefix] = value
                changes.prefixes[prefix] = value
        # Freed only now: reusing a set id within one batch would clash with its queued deletes.
        self._free_sets.extend(self._freed)
        return changes

    def _set_ports(self, prefix: Prefix, table: dict[PortMatch, Verdict], ch: Changes) -> int:
        old = self.port_entries.get(prefix, {})
        if not table and not old:
            return NO_PORT_SET
        set_id = self.port_set_ids.get(prefix)
        if set_id is None:
            set_id = self._free_sets.pop() if self._free_sets else self._next_set
            if set_id == self._next_set:
                self._next_set += 1
            self.port_set_ids[prefix] = set_id
        for pm, verdict in table.items():
            if old.get(pm) != verdict:
                ch.ports[(set_id, *pm)] = verdict
        ch.deleted_ports.extend((set_id, *pm) for pm in old if pm not in table)
        if table:
            self.port_entries[prefix] = dict(table)
            return set_id
        del self.port_entries[prefix]
        del self.port_set_ids[prefix]
        self._freed.append(set_id)
        return NO_PORT_SET
