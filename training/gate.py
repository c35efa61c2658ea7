"""The evaluation gate: a new model becomes champion only if it is not worse than the champion.

"Not worse" is: its F2 on the shared holdout is at least the champion's minus
``STILLTAG_GATE_TOLERANCE``. The first model becomes champion. A model that does not pass stays a
candidate, with the reason recorded (``stilltag models list`` shows it; ``stilltag models
promote`` overrides the gate).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from shared import registry
from shared.registry import ModelVersion


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(*, f2: float, champion: ModelVersion | None, tolerance: float) -> Decision:
    """Whether a model with holdout ``f2`` should replace ``champion``."""
    if champion is None:
        return Decision(True, f"first model (holdout F2 {f2:.4f})")
    champion_f2 = champion.metrics.get("f2")
    if not isinstance(champion_f2, (int, float)):
        return Decision(
            False,
            f"champion {champion.version} has no holdout F2 to compare with (registered by hand?); "
            f"this model scored {f2:.4f}: promote it with `stilltag models promote` if it is better",
        )
    bar = champion_f2 - tolerance
    verdict = (f"holdout F2 {f2:.4f} vs champion {champion.version} {champion_f2:.4f} "
               f"(tolerance {tolerance:g}, bar {bar:.4f})")
    if f2 >= bar:
        return Decision(True, f"passed the gate: {verdict}")
    return Decision(False, f"stays candidate: {verdict}")


def apply(*, session: Session, record: ModelVersion, tolerance: float) -> tuple[ModelVersion, Decision]:
    """Decide against the current champion and promote or record the reason, in ``session``'s transaction."""
    decision = decide(f2=float(record.metrics.get("f2", 0.0)), champion=registry.champion(session=session),
                      tolerance=tolerance)
    if decision.promote:
        return registry.promote(session=session, version=record.version, reason=decision.reason), decision
    registry.set_candidate_reason(session=session, version=record.version, reason=decision.reason)
    return registry.get_version(session=session, version=record.version), decision
