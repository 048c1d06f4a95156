"""The exactly-once verdict of a run, built from the warehouse's validation SQL.

A run is exactly-once when captioned(run) + dead_lettered(run) == manifest(run),
every manifest id appears exactly once across captions(run) and dead_letters(run),
none in both, none that the manifest lacks, and the captions table holds no
duplicate image_id at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: problem kinds reported by sql.VALIDATION_PROBLEMS, with what each means
PROBLEM_KINDS: dict[str, str] = {
    "missing": "manifest ids with neither a caption nor a dead letter",
    "extra": "captioned/dead-lettered ids that are not in the manifest",
    "both": "ids both captioned and dead-lettered",
    "repeated": "ids present more than once across captions and dead letters",
    "duplicate_caption": "image_ids more than once in the whole captions table",
    "duplicate_manifest": "image_ids more than once in the manifest",
}


class ExactlyOnceError(RuntimeError):
    """The run lost, invented or duplicated images (message has counts and samples)."""


@dataclass
class ValidationResult:
    """Counts and sample ids from validating one run."""

    run_id: str
    manifest: int
    captioned: int
    dead_lettered: int
    missing_ids: list[str] = field(default_factory=list)
    extra_ids: list[str] = field(default_factory=list)
    both_ids: list[str] = field(default_factory=list)
    repeated_ids: list[str] = field(default_factory=list)
    duplicate_caption_ids: list[str] = field(default_factory=list)
    duplicate_manifest_ids: list[str] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.captioned + self.dead_lettered == self.manifest and not any(
            self.problem_counts.values()
        )

    @property
    def message(self) -> str:
        head = (
            f"run {self.run_id}: manifest={self.manifest} captioned={self.captioned} "
            f"dead_lettered={self.dead_lettered}"
        )
        if self.ok:
            return f"{head}: exactly-once OK"
        parts = [head]
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
        return {**dataclasses.asdict(self), "ok": self.ok, "message": self.message}


def result_from_rows(
    run_id: str, counts: dict[str, Any], problems: Iterable[dict[str, Any]]
) -> ValidationResult:
    """Assemble a :class:`ValidationResult` from the two validation queries' rows."""
    result = ValidationResult(
        run_id=run_id,
        manifest=int(counts["manifest"]),
        captioned=int(counts["captioned"]),
        dead_lettered=int(counts["dead_lettered"]),
    )
    for row in problems:
        kind = str(row["kind"])
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown validation problem kind {kind!r}")
        getattr(result, f"{kind}_ids").append(str(row["image_id"]))
        result.problem_counts[kind] = int(row["total"])
    return result
