"""/api/v1/explain: which rule decides for an address, answered by the loaded program
(xdpfw/explain.py): the verdict, the reason and the deciding rule, and every rule whose
prefix contains the address, in the order they decide."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from xdpfw.api.deps import FirewallDep
from xdpfw.api.error_body import responses
from xdpfw.api.schemas import RulePublic
from xdpfw.explain import Probe
from xdpfw.rules.model import Proto

router = APIRouter(prefix="/api/v1/explain", tags=["rules"])


class ExplainInterface(BaseModel):
    name: str
    netns: str | None


class ExplainPublic(BaseModel):
    packet: str = Field(description="the probe the program ran on")
    verdict: str = Field(description="drop or pass: what the interface's instance returns "
                         "(a pass may then go to the load balancer)")
    reason: str = Field(description="the reason it is counted under (GET /api/v1/stats)")
    rule: RulePublic | None = Field(description="the deciding rule; null: a policy decided")
    interface: ExplainInterface | None = Field(
        description="null: no interface given (the rules alone; a pass policy)")
    policy: str = Field(description="what no rule decides gets")
    covering: list[RulePublic] = Field(
        description="every rule whose prefix contains the source, in the order they decide")


@router.get("", response_model=ExplainPublic, responses=responses(404))
def explain(
    fw: FirewallDep,
    src: Annotated[str, Query(description="the source address")],
    dst: Annotated[str | None, Query(description="destination (default: a documentation "
                                     "address)")] = None,
    proto: Annotated[Proto | None, Query(description="none: a protocol no rule names, so "
                                         "only rules of any protocol decide")] = None,
    dport: Annotated[int | None, Query(ge=1, le=65535)] = None,
    interface: Annotated[str | None, Query(description="decide as this attached "
                                           "interface's instance (its policy)")] = None,
    netns: str | None = None,
) -> ExplainPublic:
    probe = Probe.of(src, dst, proto, dport)
    e = fw.explain(probe, interface, netns)
    return ExplainPublic(
        packet=probe.describe(), verdict=e.verdict, reason=e.reason,
        rule=RulePublic.of(e.rule, fw.rule_counter(e.rule)) if e.rule else None,
        interface=ExplainInterface(name=e.interface[0], netns=e.interface[1])
        if e.interface else None,
        policy=e.policy,
        covering=[RulePublic.of(r, fw.rule_counter(r)) for r in e.covering])
