"""What a rule does beyond its prefix (action, protocol, port, comment, set), as the one
pydantic model every input form validates with: an API body, a section of an export, a
config file's [[rules]] and [[sets]]. The checks themselves live in xdpfw.rules.model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from xdpfw.errors import RuleValidationError
from xdpfw.rules.model import Action, Proto, check_match, check_set_name

ACTION_ALIASES = {"allow": "pass", "accept": "pass", "deny": "drop", "block": "drop"}


def invalid(e: RuleValidationError) -> PydanticCustomError:
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
            raise invalid(e) from None
        return self


class RuleKind(RuleMatch):
    """A match and a set: what rules sharing a section of an export have in common."""

    set: str = Field("", description="the named set the rules belong to ('': none)")

    @field_validator("set")
    @classmethod
    def _set_name(cls, v: str) -> str:
        if v:
            try:
                check_set_name(v)
            except RuleValidationError as e:
                raise invalid(e) from None
        return v
