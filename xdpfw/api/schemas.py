"""Request and response models. Validation itself lives in xdpfw.rules.model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from xdpfw.dataplane.attach import Mode
from xdpfw.errors import RuleValidationError
from xdpfw.rules.document import JsonDocument
from xdpfw.rules.kind import RuleKind, invalid
from xdpfw.rules.model import Action, Proto, Rule, check_set_name, parse_prefix
from xdpfw.service import Attachment, RuleSpec, SyncReport

Policy = Literal["pass", "drop"]


class RuleCreate(RuleKind):
    prefix: str = Field(description="source prefix, e.g. 203.0.113.0/24 or 2001:db8::/32")

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, v: str) -> str:
        try:
            return str(parse_prefix(v))
        except RuleValidationError as e:
            raise invalid(e) from None

    def spec(self) -> RuleSpec:
        prefix = parse_prefix(self.prefix)
        return RuleSpec(prefix, self.action, self.proto, self.dport, self.comment, self.set)


class BulkPrefixes(RuleKind):
    """Many prefixes sharing one action/match: the fast form of a bulk request."""

    prefixes: list[str] = Field(min_length=1)


class BulkRules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[RuleCreate] = Field(min_length=1)


def _bulk_form(v: Any) -> str | None:
    if isinstance(v, dict):
        if "format" in v or "sections" in v:
            return "export"
        return "rules" if "rules" in v else "prefixes"
    return None  # not an object: the union's own error names every form


# The JSON body of every endpoint that takes many rules (api/bodies.py), chosen by its keys,
# not guessed from its first bytes.
BULK_BODY: TypeAdapter[BulkPrefixes | BulkRules | JsonDocument] = TypeAdapter(Annotated[
    Annotated[BulkPrefixes, Tag("prefixes")] | Annotated[BulkRules, Tag("rules")]
    | Annotated[JsonDocument, Tag("export")],
    Discriminator(_bulk_form, custom_error_type="bulk_body",
                  custom_error_message='the body must be a JSON object with "prefixes" (and '
                  'one action/match for all), "rules" (a list of rules), or an export '
                  '("format": "xdpfw-rules", "sections")'),
])


class RulePublic(BaseModel):
    id: int
    prefix: str
    action: Action
    proto: Proto | None
    dport: int | None
    comment: str
    set: str = Field(description="the named set the rule belongs to ('': none)")
    packets: int
    bytes: int

    @classmethod
    def of(cls, rule: Rule, counters: tuple[int, int]) -> RulePublic:
        return cls(
            id=rule.id,
            prefix=str(rule.prefix),
            action=rule.action,
            proto=rule.proto,
            dport=rule.dport,
            comment=rule.comment,
            set=rule.rule_set,
            packets=counters[0],
            bytes=counters[1],
        )


class RulePage(BaseModel):
    items: list[RulePublic]
    total: int
    limit: int
    offset: int


class BulkResult(BaseModel):
    added: int
    first_id: int | None = Field(description="ids of the rules added (none: null)")
    last_id: int | None
    skipped: int = Field(0, description="rules left out as existing (skip_existing)")


class SetPublic(BaseModel):
    name: str
    rules: int


class SyncResult(BaseModel):
    """What making a set (or every rule) exactly a list did, or would do (dry_run)."""

    added: int
    removed: int
    kept: int = Field(description="in both, unchanged: same id, same counters")
    changed: int = Field(description="in both with another action, comment or set: a new "
                         "rule (new id) in the same entry, its verdict changed in place")
    first_id: int | None = Field(description="ids of the rules added and changed")
    last_id: int | None
    dry_run: bool
    examples: dict[str, list[str]] = Field(
        description="the first few added, removed and changed rules")

    @classmethod
    def of(cls, r: SyncReport) -> SyncResult:
        return cls(added=r.added, removed=r.removed, kept=r.kept, changed=r.changed,
                   first_id=r.ids[0] if r.ids else None,
                   last_id=r.ids[-1] if r.ids else None, dry_run=r.dry_run,
                   examples=r.examples)


class FleetSetWritten(BaseModel):
    """A fleet set written to etcd (PUT /api/v1/fleet/sets/{name}, and PUT
    /api/v1/sets/{name} on a fleet node)."""

    name: str
    count: int = Field(description="prefixes in the set")
    chunks: int
    chunks_written: int = Field(description="chunks new in etcd (the others were kept)")
    chunks_kept: int
    action: Action
    comment: str
    revision: int = Field(description="the etcd revision that holds the manifest")
    applied_here: bool = Field(description="this node enforced it before answering")


class FleetSetDeleted(BaseModel):
    """A fleet set deleted (DELETE /api/v1/fleet/sets/{name}, and DELETE /api/v1/sets/{name}
    on a fleet node)."""

    name: str
    revision: int
    applied_here: bool


class RuleSelection(BaseModel):
    """Rules to delete in one request: exactly one of ids, set, comment."""

    model_config = ConfigDict(extra="forbid")

    ids: list[int] | None = Field(None, min_length=1, max_length=1_000_000,
                                  description="rule ids; every one must exist")
    set: str | None = Field(None, description="every rule of this set")
    comment: str | None = Field(None, description="every rule whose comment is exactly this")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("ids", "set", "comment") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "selection", "give exactly one of ids, set, comment (got {given})",
                {"given": ", ".join(given) or "none"})
        if self.set is not None:
            try:
                check_set_name(self.set)
            except RuleValidationError as e:
                raise invalid(e) from None
        return self

    def describe(self) -> str:
        if self.ids is not None:
            return f"{len(self.ids)} ids"
        return f"set {self.set}" if self.set is not None else f"comment {self.comment!r}"


class InterfaceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=15)
    netns: str | None = Field(None, description="network namespace the interface lives in")
    mode: Mode = Mode.AUTO
    policy: Policy = Field("pass", description="verdict for packets no rule decides")
    unparsed_policy: Policy = Field(
        "pass", description="verdict for packets the parser cannot read"
    )
    guard_l2: bool = Field(False, description="let a drop policy drop ARP and IPv6 ND as well")
    chain_existing: bool = Field(
        True, description="an XDP program already on the interface runs after xdpfw's pass "
        "verdicts, and gets the interface back when xdpfw detaches (false: refuse to attach "
        "over it)")
    chain_prog_id: int | None = Field(
        None, ge=1, description="a loaded XDP program (its id, as `bpftool prog` shows) to run "
        "after xdpfw's pass verdicts; it gets the interface when xdpfw detaches")


class InterfacePublic(BaseModel):
    name: str
    netns: str | None
    ifindex: int
    slot: int = Field(description="the interface slot: its policy, counters and instance")
    mode: Mode = Field(description="mode requested")
    mode_in_use: Mode
    policy: Policy
    unparsed_policy: Policy
    guard_l2: bool
    chained_prog_id: int | None = Field(description="the program run after xdpfw's passes")

    @classmethod
    def of(cls, att: Attachment, chained: int | None = None) -> InterfacePublic:
        r = att.record
        return cls(
            name=r.name,
            netns=r.netns,
            ifindex=att.ifindex,
            slot=r.slot,
            mode=Mode(r.mode),
            mode_in_use=att.mode_in_use,
            policy=r.policy,
            unparsed_policy=r.unparsed_policy,
            guard_l2=r.guard_l2,
            chained_prog_id=chained,
        )
