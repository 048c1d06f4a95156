"""The exactly-once verdict of a run, built from the warehouse's validation SQL.

A run is exactly-once when what it published (its rows in the ``published_images``
ledger, which later runs never relabel) matches its manifest: captioned(run) +
dead_lettered(run) == manifest(run), each manifest id exactly once, none the manifest
lacks, and each still has a current outcome. The whole tables are checked with it: no
image_id twice in captions or in dead_letters, none in both, and every current row
provable from the ledger of the run that wrote it. Recipes: every outcome a run published
carries the recipe it was planned with, and every current caption row the recipe its run
published (``captioning.recipe``), so a row always says what produced it.

Content, not only presence: the captions the run published (its ledger rows: image_id,
recipe, caption text) are counted and checksummed in the warehouse and compared with what
the Beam job says it wrote (``run_summary.json`` ``written``, :class:`WrittenCaptions`), so a
caption changed, added or dropped between the job and publish fails the run. Time: no
outcome may be dated after it was published (``dated_ahead``), no current row after now
(``future_row``), and each outcome of the run must be current or superseded by a newer one
(``stale``).

Separately, a run that captioned nothing, or dead-lettered more than the configured
share of its manifest, is refused (:func:`check_outcome_share`) with the reasons counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

#: How far a timestamp may run ahead of the clock that checks it (worker clocks drift).
CLOCK_SKEW_S = 300

#: problem kinds reported by sql.VALIDATION_PROBLEMS, with what each means
PROBLEM_KINDS: dict[str, str] = {
    "missing": "manifest ids the run published neither as a caption nor as a dead letter",
    "extra": "ids the run published that are not in its manifest",
    "repeated": "ids the run published more than once",
    "unaccounted": "ids the run published that now have neither a caption nor a dead letter",
    "duplicate_manifest": "image_ids more than once in the manifest",
    "duplicate_caption": "image_ids more than once in the whole captions table",
    "duplicate_dead_letter": "image_ids more than once in the whole dead_letters table",
    "both": "image_ids both captioned and dead-lettered (whole tables)",
    "unproven": "caption/dead-letter rows no run's published set accounts for",
    "wrong_recipe": "ids the run published with another recipe than the one it was planned with",
    "recipe_mismatch": "caption rows whose recipe differs from what their run published",
    "caption_mismatch": "caption rows whose text differs from what their run published",
    "dated_ahead": "ids the run published dated more than "
                   f"{CLOCK_SKEW_S} s after it published them (a clock ahead, or the staged "
                   "rows rewritten; stored as of the publish, they outrank no later outcome)",
    "future_row": f"caption/dead-letter rows dated more than {CLOCK_SKEW_S} s in the future",
    "stale": "ids the run published whose outcome is neither current nor superseded by a "
             "newer one",
}


class WrittenCaptions(NamedTuple):
    """What the Beam job says it wrote: its caption rows and the sum of their digests
    (``captioning.sinks.caption_digest``: image_id, recipe, caption text)."""

    rows: int
    checksum: int


class ExactlyOnceError(RuntimeError):
    """The run lost, invented or duplicated images (message has counts and samples)."""


class RunOutcomeError(RuntimeError):
    """The run captioned nothing, or dead-lettered more than the allowed share."""


@dataclass
class ValidationResult:
    """Counts and sample ids from validating one run."""

    run_id: str
    manifest: int
    captioned: int
    dead_lettered: int
    missing_ids: list[str] = field(default_factory=list)
    extra_ids: list[str] = field(default_factory=list)
    repeated_ids: list[str] = field(default_factory=list)
    unaccounted_ids: list[str] = field(default_factory=list)
    duplicate_manifest_ids: list[str] = field(default_factory=list)
    duplicate_caption_ids: list[str] = field(default_factory=list)
    duplicate_dead_letter_ids: list[str] = field(default_factory=list)
    both_ids: list[str] = field(default_factory=list)
    unproven_ids: list[str] = field(default_factory=list)
    wrong_recipe_ids: list[str] = field(default_factory=list)
    recipe_mismatch_ids: list[str] = field(default_factory=list)
    caption_mismatch_ids: list[str] = field(default_factory=list)
    dated_ahead_ids: list[str] = field(default_factory=list)
    future_row_ids: list[str] = field(default_factory=list)
    stale_ids: list[str] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)
    #: the job's own account of its caption rows (None: not known, content not checked)
    written: WrittenCaptions | None = None
    #: the captions the run published (its ledger rows), counted and checksummed alike
    published: WrittenCaptions | None = None
    #: why the content was not checked (no run summary ...), when it was not
    content_unchecked: str | None = None

    @property
    def content_ok(self) -> bool:
        """The published captions are the ones the job wrote (True when not checked)."""
        return self.written is None or self.published == self.written

    @property
    def ok(self) -> bool:
        return self.captioned + self.dead_lettered == self.manifest and not any(
            self.problem_counts.values()
        ) and self.content_ok

    @property
    def message(self) -> str:
        head = (
            f"run {self.run_id}: manifest={self.manifest} captioned={self.captioned} "
            f"dead_lettered={self.dead_lettered}"
        )
        if self.ok:
            content = (f"content not checked: {self.content_unchecked}"
                       if self.written is None and self.content_unchecked else
                       f"the {self.published.rows} published caption(s) are the ones the job "
                       f"wrote (checksum {self.published.checksum})"
                       if self.written is not None and self.published is not None else "")
            return f"{head}: exactly-once OK" + (f"; {content}" if content else "")
        parts = [head]
        if not self.content_ok:
            published = self.published or WrittenCaptions(0, 0)
            parts.append(
                f"the job wrote {self.written.rows} caption row(s) (checksum "
                f"{self.written.checksum}) but the run published {published.rows} (checksum "
                f"{published.checksum}): caption text, image ids or recipes changed between "
                f"the job and publish (compare the job's output with published_images WHERE "
                f"run_id = '{self.run_id}')")
        if self.captioned + self.dead_lettered != self.manifest:
            parts.append(
                f"captioned + dead_lettered = {self.captioned + self.dead_lettered} "
                f"!= manifest {self.manifest}"
            )
        for kind, meaning in PROBLEM_KINDS.items():
            count = self.problem_counts.get(kind, 0)
            if count:
                sample = getattr(self, f"{kind}_ids")
                parts.append(f"{count} {meaning} (e.g. {', '.join(sample)})")
        return "; ".join(parts)

    def raise_if_failed(self) -> ValidationResult:
        """Raise :class:`ExactlyOnceError` unless the run is exactly-once."""
        if not self.ok:
            raise ExactlyOnceError(self.message)
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("written", "published"):
            value = getattr(self, name)
            out[name] = None if value is None else value._asdict()
        return {**out, "ok": self.ok, "message": self.message}


def result_from_rows(
    run_id: str, counts: dict[str, Any], problems: Iterable[dict[str, Any]],
    published: dict[str, Any] | None = None, written: WrittenCaptions | None = None,
    content_unchecked: str | None = None,
) -> ValidationResult:
    """Assemble a :class:`ValidationResult` from the validation queries' rows
    (``published``: the run's published captions counted and checksummed, ``captions`` and
    ``checksum``; ``written``: the job's account, None when unknown)."""
    result = ValidationResult(
        run_id=run_id,
        manifest=int(counts["manifest"]),
        captioned=int(counts["captioned"]),
        dead_lettered=int(counts["dead_lettered"]),
        written=written,
        published=None if published is None else WrittenCaptions(
            int(published.get("captions") or 0), int(published.get("checksum") or 0)),
        content_unchecked=content_unchecked,
    )
    for row in problems:
        kind = str(row["kind"])
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown validation problem kind {kind!r}")
        getattr(result, f"{kind}_ids").append(str(row["image_id"]))
        result.problem_counts[kind] = int(row["total"])
    return result


def check_outcome_share(result: ValidationResult, reasons: Iterable[dict[str, Any]],
                        max_share: float) -> None:
    """Raise :class:`RunOutcomeError` when a run captioned nothing, or dead-lettered more than
    ``max_share`` of the images it tried for the first time; the message counts the reasons
    by kind.

    Dead letters another run already had (``repeat``: an incremental run retrying known-bad
    files) are left out of both sides of the share, so a nightly run is not failed by the
    same corrupt files every night. A run where every new image failed is a broken setting
    or model far more often than a broken corpus (``max_new_tokens`` above the model's
    limit, say): it must not be green.
    """
    reasons = list(reasons)
    repeats = sum(r["n"] for r in reasons if r.get("repeat"))
    fresh_total = result.manifest - repeats
    if fresh_total <= 0:
        return
    share = (result.dead_lettered - repeats) / fresh_total
    if result.captioned > 0 and share <= max_share:
        return
    counted = ", ".join(
        f"{r['n']} {r['stage']}/{r['kind']}{' (failed before too)' if r.get('repeat') else ''}"
        for r in reasons) or "none recorded"
    why = ("captioned nothing" if result.captioned == 0 else
           f"dead-lettered {share:.0%} of the images it tried for the first time, above "
           f"max_dead_letter_share {max_share:.0%}")
    raise RunOutcomeError(
        f"run {result.run_id} {why}: {result.dead_lettered} of {result.manifest} images "
        f"dead-lettered; reasons by stage/kind: {counted}")
