"""Status and Event composition: how a VariantAutoscaling's state is said on its status and in Events.

What it decides: the condition types and the `Ready` summary, a condition's lastTransitionTime, and
whether an Event is a repeat to leave out (same reason and message, or a volatile reason within
EVENT_REPEAT_S).

What it may not touch: the Kubernetes API (the controller writes the bodies and Events it composes) and
the decision itself: it words what the cycle found, never changes what is scaled.
"""

from __future__ import annotations

from datetime import UTC, datetime

CONDITIONS = ("TargetResolved", "MetricsAvailable", "OptimizationReady", "Actuated")
CONFLICT = "ConflictingAutoscaler"  # present (True) only while an HPA scales the same target in direct mode
READY = "Ready"  # the summary (kubectl wait --for=condition=Ready va/NAME): True when all of CONDITIONS are


def with_ready(conds: dict[str, tuple[str, str, str]]) -> dict[str, tuple[str, str, str]]:
    """The specific conditions plus the `Ready` summary: True (reason Ready) when every one is True,
    else the status, reason and message of the first one that is not."""
    for kind in CONDITIONS:
        status, reason, message = conds[kind]
        if status != "True":
            return {**conds, READY: ("False" if status == "False" else "Unknown", reason, f"{kind}: {message}")}
    return {**conds, READY: ("True", "Ready", "target found, metrics available, optimized and actuated")}


EVENT_REPEAT_S = 600.0
VOLATILE_EVENTS = frozenset({"Infeasible", "MetricsUnavailable", "NoReplacement"})


def is_repeat(last: tuple[str, str, float] | None, reason: str, message: str, now: float) -> bool:
    """An Event this resource already got: the same reason and message last time, or, for reasons whose
    numbers move every cycle (VOLATILE_EVENTS), the same reason within EVENT_REPEAT_S."""
    if last is None:
        return False
    same_reason, same_text = last[0] == reason, last[1] == message
    return same_reason and (same_text or (reason in VOLATILE_EVENTS and now - last[2] < EVENT_REPEAT_S))


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(previous: list[dict], kind: str, status: str, reason: str, message: str, generation: int,
              now: str) -> dict:
    """One status condition; lastTransitionTime stays the previous one while the status is unchanged."""
    old = next((c for c in previous or [] if c.get("type") == kind), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else now
    return {"type": kind, "status": status, "reason": reason, "message": message[:2000],
            "observedGeneration": generation, "lastTransitionTime": since or now}


def condition_list(previous: list[dict], conds: dict[str, tuple[str, str, str]], generation: int,
                   now: str) -> list[dict]:
    """status.conditions from (status, reason, message) per type, in the fixed order: the specific
    conditions, the HPA conflict where present, then Ready."""
    return [condition(previous, c, *conds[c], generation, now) for c in (*CONDITIONS, CONFLICT, READY) if c in conds]
