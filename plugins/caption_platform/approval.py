"""A person approves a run whose forecast cost is above the deployment's soft limit.

``approve_above_usd`` (settings) is the soft limit; ``max_cost_usd`` stays the hard refusal
in the plan. Above the soft limit the run waits in Airflow's own ``AWAITING_INPUT`` state
(the standard provider's ``ApprovalOperator``: Airflow 3.3 parks the task with no trigger),
answered in the UI (Browse > Required Actions, or the task's "Required Action" tab) or
through ``PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/approve/-1/hitlDetails``.
Who may answer is Airflow's own permission to edit the DAG's HITL details (the ``Op`` and
``Admin`` roles, or a role granted "can edit" on the DAG). Reject skips caption and
publish; no answer within ``approval_timeout_s`` is a reject recorded as timed out.
``pipeline_runs`` says which, and who answered.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

if TYPE_CHECKING:
    from caption_platform.plan import RunPlan

#: XCom key of the decision record_metrics writes into the run's row
DECISION_KEY = "approval"
APPROVED, REJECTED, TIMED_OUT, NOT_NEEDED = "approved", "rejected", "timed_out", "not_needed"


def needs_approval(plan: RunPlan) -> bool:
    """Above the soft limit, or unpriced while a soft limit is set (a cost nobody can state
    is not below it)."""
    limit = plan.settings.approve_above_usd
    if limit is None:
        return False
    return plan.forecast_cost_usd is None or plan.forecast_cost_usd > limit


def gpu_hours(plan: RunPlan) -> float | None:
    """The forecast's GPU hours: its wall time over the planned workers' GPUs (None
    without a GPU or a runtime forecast)."""
    df = plan.settings.dataflow
    runtime = plan.forecast_runtime_s
    if not plan.settings.on_dataflow or not df.accelerator_count or runtime is None:
        return None
    return runtime * df.max_num_workers * df.accelerator_count / 3600.0


def request(plan: RunPlan) -> tuple[str, str]:
    """The subject and the Markdown body the person reads before answering."""
    settings, stats = plan.settings, plan.manifest_stats
    cost = plan.forecast_cost_usd
    priced = "unpriced" if cost is None else f"${cost:,.2f}"
    subject = (f"Approve caption run {plan.run_id}: forecast {priced}, above the "
               f"${settings.approve_above_usd:,.2f} that needs approval")
    df = settings.dataflow
    shape = (f"{df.max_num_workers} x {df.machine_type}"
             + (f" with {df.accelerator_count} x {df.accelerator_type}"
                if df.accelerator_count and df.accelerator_type else "")
             + f" in {df.region}") if settings.on_dataflow else f"local ({settings.runner})"
    hours = gpu_hours(plan)
    recipe = plan.recipe or {}
    rows = [
        ("Images", f"{plan.images:,} (new {stats.get('new', 0):,}, retried "
                   f"{stats.get('retried', 0):,}, re-captioned {stats.get('recaptioned', 0):,})"),
        ("Forecast cost", priced),
        ("Forecast basis", plan.forecast_message or "none recorded"),
        ("GPU hours", "none" if hours is None else f"{hours:,.1f}"),
        ("Worker shape", shape),
        ("Recipe", f"`{plan.recipe_fingerprint}`: BLIP {recipe.get('blip_model', '?')}, "
                   f"CLIP {recipe.get('clip_model', '?')}" if plan.recipe_fingerprint
         else "none"),
        ("Hard limit (max_cost_usd)", "none" if settings.max_cost_usd is None
         else f"${settings.max_cost_usd:,.2f}"),
        ("No answer within", f"{settings.approval_timeout_s / 3600:.1f} h: rejected"),
    ]
    body = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return subject, body


class CaptionApprovalOperator(ApprovalOperator):
    """Wait for a person when the run's forecast is above ``approve_above_usd``; else go on
    at once. Reject (or no answer in time) skips the caption task and what follows it."""

    def __init__(self, *, plan_task_id: str = "plan", **kwargs: Any) -> None:
        super().__init__(subject="Approve the caption run", defaults=["Reject"], **kwargs)
        self.plan_task_id = plan_task_id

    def execute(self, context: Any) -> Any:
        from caption_platform.plan import RunPlan

        ti = context["ti"]
        plan = RunPlan.from_xcom(ti.xcom_pull(task_ids=self.plan_task_id))
        if not needs_approval(plan):
            self.log.info("forecast %s is not above approve_above_usd %s: no approval needed",
                          plan.forecast_cost_usd, plan.settings.approve_above_usd)
            ti.xcom_push(key=DECISION_KEY, value={"decision": NOT_NEEDED})
            return None
        self.subject, self.body = request(plan)
        self.response_timeout = timedelta(seconds=plan.settings.approval_timeout_s)
        self.log.info("%s: waiting for a person (Required Actions in the UI, or the REST "
                      "API), at most %.0f s", self.subject, plan.settings.approval_timeout_s)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        approved = list(event.get("chosen_options") or []) == [self.APPROVE]
        decision = APPROVED if approved else TIMED_OUT if event.get("timedout") else REJECTED
        user = event.get("responded_by_user") or {}
        by = user.get("name") or user.get("id") if isinstance(user, dict) else str(user)
        context["ti"].xcom_push(key=DECISION_KEY, value={
            "decision": decision, "by": by,
            "at": str(event.get("responded_at") or "")})
        if decision == TIMED_OUT:
            self.log.warning("no answer within approval_timeout_s: the run is rejected")
        else:
            self.log.info("%s by %s", decision, by)
        return super().execute_complete(context, event)
