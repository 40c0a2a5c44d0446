"""Quality-gated promotion: the `serving` ref moves only to versions that are valid and no worse.

Every version the training worker commits carries its quality report in the record's quality
metrics (spectral_core/quality.py), computed on exactly the weights it stores. `decide` compares
a candidate with the version the `serving` ref names; `Promoter` applies the decision to the
chain: it moves the ref (an audited compare-and-swap, like any ref) or appends an audited
refusal. Tracking replicas serve `serving` (storage/inference.py), so a diverged, NaN or worse
model is never served automatically; admins can still pin any version.

A candidate is promoted when:
- its report exists and is finite: a NaN model or a record with no report is refused;
- it is a CF: |F_0 - 1| and |F_k| - 1 within `cf_tolerance`, the COS density no more negative
  than `density_tolerance` of its peak, its puts inside the no-arbitrage bounds to
  `arbitrage_tolerance_bp`;
- its held-out error is no worse than the served version's beyond the noise of the estimate:
  mean <= served mean + `max_regression_se` * sqrt(se^2 + served se^2). Both are means over the
  same validation contracts when the config is the same; the standard errors are those of each
  mean over contracts, so the bound is conservative towards promotion of an equal model and
  refuses one worse by more than its noise.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.chain import VersionChain, VersionRecord

log = logging.getLogger(__name__)

SERVING_REF = "serving"
# The key whose presence marks a record as assessed (spectral_core.quality.ASSESSED_KEY; kept
# as a literal here so storage needs nothing from the core to read records).
ASSESSED_KEY = "held_out_mean_bp"


@dataclass(frozen=True)
class PromotionPolicy:
    enabled: bool = True  # False: every committed version is promoted (no gate)
    max_regression_se: float = 1.0
    cf_tolerance: float = 1e-6
    density_tolerance: float = 0.02
    arbitrage_tolerance_bp: float = 100.0
    actor: str = "promoter"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


def is_assessed(record: VersionRecord) -> bool:
    """The record carries a quality report (written since promotion exists)."""
    return ASSESSED_KEY in record.quality_metrics


def _num(q: Mapping[str, Any], key: str) -> float:
    v = q.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return math.nan
    return float(v)


def validity_problems(q: Mapping[str, Any], policy: PromotionPolicy) -> list[str]:
    """Why the report `q` is not a valid CF model (empty: valid)."""
    if ASSESSED_KEY not in q:
        return ["no quality report"]
    if q.get("finite") is not True:
        return ["non-finite model output"]
    problems = []
    mean = _num(q, "held_out_mean_bp")
    if not math.isfinite(mean):
        problems.append("held-out error is not finite")
    f0 = _num(q, "f0_max_err")
    if not f0 <= policy.cf_tolerance:
        problems.append(f"|F_0 - 1| = {f0:.3g} > {policy.cf_tolerance:g}")
    modulus = _num(q, "max_modulus")
    if not modulus <= 1.0 + policy.cf_tolerance:
        problems.append(f"max |F_k| = {modulus:.6g} > 1 + {policy.cf_tolerance:g}")
    dens = _num(q, "min_density_rel")
    if not dens >= -policy.density_tolerance:
        problems.append(f"COS density dips to {dens:.3g} of its peak "
                        f"(tolerance {-policy.density_tolerance:g})")
    arb = _num(q, "arbitrage_max_bp")
    if not arb <= policy.arbitrage_tolerance_bp:
        problems.append(f"puts outside the no-arbitrage bounds by {arb:.3g} bp "
                        f"(tolerance {policy.arbitrage_tolerance_bp:g} bp)")
    return problems


def decide(
    candidate: VersionRecord, served: VersionRecord | None, policy: PromotionPolicy
) -> Decision:
    """Whether `candidate` may replace `served` (None: nothing served yet) as `serving`."""
    q = candidate.quality_metrics
    if not policy.enabled:
        return Decision(True, "gate disabled", {"candidate": candidate.counter})
    detail: dict[str, Any] = {
        "candidate": candidate.counter,
        "held_out_mean_bp": q.get("held_out_mean_bp"),
        "held_out_se_bp": q.get("held_out_se_bp"),
    }
    problems = validity_problems(q, policy)
    if problems:
        return Decision(False, "invalid", {**detail, "problems": problems})
    if served is None:
        return Decision(True, "first", detail)
    detail["served"] = served.counter
    if candidate.config_fingerprint != served.config_fingerprint or not is_assessed(served):
        # another config's validation set, or a record from before reports: not comparable
        return Decision(True, "not comparable", detail)
    mean, se = _num(q, "held_out_mean_bp"), _num(q, "held_out_se_bp")
    sq = served.quality_metrics
    s_mean, s_se = _num(sq, "held_out_mean_bp"), _num(sq, "held_out_se_bp")
    detail.update(served_mean_bp=served.quality_metrics.get("held_out_mean_bp"),
                  served_se_bp=served.quality_metrics.get("held_out_se_bp"))
    if not math.isfinite(s_mean):
        return Decision(True, "served version has no finite error", detail)
    noise = math.hypot(se if math.isfinite(se) else 0.0, s_se if math.isfinite(s_se) else 0.0)
    bound = s_mean + policy.max_regression_se * noise
    detail["bound_bp"] = bound
    if mean <= bound:
        return Decision(True, "better" if mean <= s_mean else "within noise", detail)
    return Decision(False, "worse", detail)


class Promoter:
    """Applies `decide` to each committed version; one decision at a time."""

    def __init__(
        self,
        chain: VersionChain,
        policy: PromotionPolicy | None = None,
        *,
        on_decision: Callable[[VersionRecord, Decision], None] | None = None,
        label: str = "chain",
    ) -> None:
        """`on_decision(record, decision)` is called after each decision is stored (metrics,
        TensorBoard, waking the model poller); `label` names the chain in log lines (several
        chains promote in one process)."""
        self.chain = chain
        self.label = label
        self.policy = policy or PromotionPolicy()
        self.on_decision = on_decision
        self._lock = asyncio.Lock()
        self.promoted = 0
        self.refused = 0

    async def served(self) -> VersionRecord | None:
        counter = await self.chain.ref(SERVING_REF)
        return None if counter is None else await self.chain.get(counter)

    async def consider(self, record: VersionRecord) -> Decision:
        """Decide on `record` and store the outcome: the ref moved, or a refusal audited."""
        async with self._lock:
            served = await self.served()
            if served is not None and served.counter >= record.counter:
                # an older version arriving late (e.g. after a newer manual commit)
                return Decision(False, "stale", {"candidate": record.counter,
                                                 "served": served.counter})
            decision = decide(record, served, self.policy)
            if decision.promote:
                await self.chain.set_ref(SERVING_REF, record.counter, actor=self.policy.actor,
                                         action="promote", detail=decision.detail)
                self.promoted += 1
                log.info("%s: promoted version %d (%s)", self.label, record.counter,
                         decision.reason)
            else:
                await self.chain.append_audit(
                    "promotion_refused", actor=self.policy.actor, ref=SERVING_REF,
                    old=None if served is None else served.counter, new=record.counter,
                    detail={"reason": decision.reason, **decision.detail},
                )
                self.refused += 1
                log.warning("%s: refused to promote version %d: %s %s", self.label,
                            record.counter, decision.reason, decision.detail)
        if self.on_decision is not None:
            try:
                self.on_decision(record, decision)
            except Exception:  # a broken callback must not lose the decision
                log.exception("promotion callback failed")
        return decision
