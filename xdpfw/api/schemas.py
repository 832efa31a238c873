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
from xdpfw.rules.model import Action, Proto, Rule, check_match, parse_prefix
from xdpfw.service import Attachment, RuleSpec

Policy = Literal["pass", "drop"]
ACTION_ALIASES = {"allow": "pass", "accept": "pass", "deny": "drop", "block": "drop"}


def _invalid(e: RuleValidationError) -> PydanticCustomError:
    """A 422 whose message is our reason, without pydantic's "Value error, " prefix."""
    return PydanticCustomError("invalid_rule", str(e).replace("{", "{{").replace("}", "}}"))


def _action(v):
    return ACTION_ALIASES.get(v, v) if isinstance(v, str) else v


class RuleMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Action = Field(Action.DROP, description="drop, or pass (alias: allow)")
    proto: Proto | None = Field(None, description="tcp, udp or icmp (ICMPv6 for IPv6)")
    dport: int | None = Field(None, description="destination port; needs proto tcp or udp")
    comment: str = Field("", max_length=256)

    _norm_action = field_validator("action", mode="before")(_action)

    @model_validator(mode="after")
    def _ports_need_proto(self):
        try:
            check_match(self.proto, self.dport)
        except RuleValidationError as e:
            raise _invalid(e) from None
        return self


class RuleCreate(RuleMatch):
    prefix: str = Field(description="source prefix, e.g. 203.0.113.0/24 or 2001:db8::/32")

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, v: str) -> str:
        try:
            return str(parse_prefix(v))
        except RuleValidationError as e:
            raise _invalid(e) from None

    def spec(self) -> RuleSpec:
        prefix = parse_prefix(self.prefix)
        return RuleSpec(prefix, self.action, self.proto, self.dport, self.comment)


class BulkPrefixes(RuleMatch):
    """Many prefixes sharing one action/match: the fast form of a bulk request."""

    prefixes: list[str] = Field(min_length=1)


class BulkRules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[RuleCreate] = Field(min_length=1)


def _bulk_form(v: Any) -> str | None:
    if isinstance(v, dict):
        return "rules" if "rules" in v else "prefixes"
    return None  # not an object: the union's own error names both forms


# POST /api/v1/rules/bulk's JSON body, chosen by its keys, not guessed from its first bytes.
BULK_BODY: TypeAdapter[BulkPrefixes | BulkRules] = TypeAdapter(Annotated[
    Annotated[BulkPrefixes, Tag("prefixes")] | Annotated[BulkRules, Tag("rules")],
    Discriminator(_bulk_form, custom_error_type="bulk_body",
                  custom_error_message='the body must be a JSON object with "prefixes" (and '
                  'one action/match for all) or "rules" (a list of rules)'),
])


class RulePublic(BaseModel):
    id: int
    prefix: str
    action: Action
    proto: Proto | None
    dport: int | None
    comment: str
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
    first_id: int
    last_id: int


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
