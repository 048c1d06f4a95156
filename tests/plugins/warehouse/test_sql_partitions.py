"""Cost follows the run: every statement over one run's rows of a run-partitioned table
names its partition, and the per-run statements over the current-state tables are bounded
by the ids the run staged or published (docs/ARCHITECTURE.md "Scale")."""

from __future__ import annotations

import re
from datetime import date

import pytest

from caption_platform.warehouse import sql, tables


def _statements() -> dict[str, str]:
    out = {}
    for name in dir(sql):
        value = getattr(sql, name)
        if name.startswith("_") or not name.isupper():
            continue
        for i, text in enumerate(value if isinstance(value, tuple) else (value,)):
            if isinstance(text, str):
                out[f"{name}[{i}]"] = text
    return out


#: a table reference, the alias it gets, and the text up to the next table reference
_REF = re.compile(r"\{(\w+)\}(?:\s+AS\s+(\w+))?")


def _reads_of_one_run(text: str) -> list[tuple[str, str]]:
    """(table kind, the predicate text) of each reference to a run-partitioned table whose
    WHERE names one run."""
    found = []
    for match in _REF.finditer(text):
        kind = match.group(1)
        if kind not in tables.RUN_PARTITIONED:
            continue
        rest = text[match.end():]
        where = re.split(r"\)|\bUNION\b|\bQUALIFY\b|\bGROUP\b|\bORDER\b|;", rest, maxsplit=1)[0]
        alias = match.group(2)
        prefix = f"{alias}." if alias else ""
        one_run = re.search(rf"\b{re.escape(prefix)}run_id\s*=\s*@run_id", where)
        if one_run or re.search(r"\bDELETE\s+FROM\s*$", text[:match.start()]):
            found.append((kind, where))
    return found


def test_every_per_run_statement_names_its_partition() -> None:
    checked = 0
    for name, text in _statements().items():
        for kind, where in _reads_of_one_run(text):
            checked += 1
            assert "run_date = @run_date" in where, (
                f"sql.{name} reads one run's rows of {kind} without its partition "
                f"predicate (run_date = @run_date): {where.strip()[:200]}")
    # the manifest, skipped files and ledger statements at least, and validation's
    assert checked >= 12


def test_the_checker_catches_a_statement_without_its_partition() -> None:
    bad = "SELECT COUNT(*) FROM {manifests} WHERE run_id = @run_id"
    assert _reads_of_one_run(bad) and "run_date" not in _reads_of_one_run(bad)[0][1]


def test_per_run_writes_to_current_state_tables_are_bounded_by_the_staged_ids() -> None:
    for text in sql.RESOLVE_OUTCOMES:
        assert re.search(r"image_id IN \(SELECT image_id FROM \{staging_", text)
    for name in ("INSERT_NEW_CAPTIONS", "INSERT_NEW_DEAD_LETTERS"):
        assert "UPDATE" not in getattr(sql, name)  # new ids only: reads image_id alone
    scoped = sql.VALIDATION_PROBLEMS
    assert "{captions} WHERE image_id IN (SELECT image_id FROM {published_images} " \
           "WHERE run_date = @run_date AND run_id = @run_id)" in scoped
    assert "WHERE TRUE" in sql.VALIDATION_PROBLEMS_WHOLE.split("problems AS")[0]


@pytest.mark.parametrize(("run_id", "expected"), [
    ("manual__2026-12-07T10:11:12.345678+00:00", date(2026, 12, 7)),
    ("scheduled__2026-01-31T00:00:00+00:00", date(2026, 1, 31)),
    ("bench__manual__2026-02-03T04:05:06+00:00__beam_2.77.0__rep1", date(2026, 2, 3)),
    ("run1", tables.UNDATED),
    ("manual__2026-13-45T00:00:00", tables.UNDATED),
])
def test_run_date_is_a_function_of_the_run_id(run_id: str, expected: date) -> None:
    assert tables.run_date(run_id) == expected


def test_run_date_in_sql_and_python_agree(tmp_path) -> None:
    """FILL_RUN_DATE (older releases' rows) gives each row the partition tables.run_date
    gives its run."""
    from caption_platform.warehouse import DuckDBWarehouse

    wh = DuckDBWarehouse(tmp_path / "w.duckdb")
    wh.ensure_tables()
    ids = ["manual__2026-12-07T10:11:12+00:00", "scheduled__2026-01-31T00:00:00+00:00",
           "run1"]
    for run_id in ids:
        wh._execute(["INSERT INTO `manifests` (run_id, image_id) VALUES (@run_id, 'x')"],
                    {"run_id": run_id})
    wh._execute([sql.FILL_RUN_DATE.format(table="`manifests`")])
    got = {r["run_id"]: r["run_date"] for r in wh._query("SELECT run_id, run_date FROM "
                                                          "`manifests`")}
    assert got == {run_id: tables.run_date(run_id) for run_id in ids}
