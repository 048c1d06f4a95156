"""Every warehouse SQL statement, written once in BigQuery standard SQL.

Placeholders in braces are table references only, filled in by the warehouse
engine after ``validate_identifier`` and quoting; column lists come from the
column declarations (``tables.py``); values are always query parameters
(``@name``). The DuckDB engine runs the same text transpiled by sqlglot, so the
tests execute this logic for real.
"""

from __future__ import annotations

CREATE_TABLE = "CREATE TABLE IF NOT EXISTS {table} ({column_defs})"
ADD_COLUMN = "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {type}"
# Every table's columns ({columns}: the engine's INFORMATION_SCHEMA.COLUMNS view).
TABLE_COLUMNS = "SELECT table_name, column_name FROM {columns}"
# BigQuery table option appended to CREATE_TABLE for per-run staging tables ({hours}: an int).
EXPIRES_IN_HOURS = (
    " OPTIONS (expiration_timestamp = TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL {hours} HOUR))"
)

# -- manifests ------------------------------------------------------------------------
# Idempotent per run: the run's rows are replaced, never appended twice.
REPLACE_MANIFEST = (
    "DELETE FROM {manifests} WHERE run_id = @run_id",
    """
    INSERT INTO {manifests} (run_id, image_id, uri, size_bytes)
    SELECT @run_id, image_id, uri, CAST(size_bytes AS INT64) FROM {staging_manifest}
    """,
)

# Images captioned by other runs: a retried or re-triggered run keeps its own manifest.
EXISTING_IMAGE_IDS = "SELECT image_id FROM {captions} WHERE run_id != @run_id"

# -- publish --------------------------------------------------------------------------
STAGED_COUNTS = """
SELECT
  (SELECT COUNT(*) FROM {staging_captions}) AS captions_staged,
  (SELECT COUNT(*) FROM {staging_dead_letters}) AS dead_letters_staged
"""

# Insert new images, update ones captioned before; a rerun changes nothing more.
# The source is de-duplicated on image_id (defence in depth: MERGE must match at
# most one source row per target row).
MERGE_CAPTIONS = """
MERGE {captions} AS T
USING (
  SELECT * FROM {staging_captions}
  WHERE TRUE
  QUALIFY ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY captioned_at DESC, uri) = 1
) AS S
ON T.image_id = S.image_id
WHEN MATCHED THEN UPDATE SET {update_set}
WHEN NOT MATCHED THEN INSERT ({column_list}) VALUES ({source_list})
"""

# dead_letters is keyed on image_id and keeps the latest failure. Images captioned
# in this run (and not also dead-lettered by it) resolve their old dead letter:
# the row is deleted, so an image is never both captioned and dead.
MERGE_DEAD_LETTERS = """
MERGE {dead_letters} AS T
USING (
  SELECT {column_list}, FALSE AS resolved
  FROM {staging_dead_letters}
  WHERE TRUE
  QUALIFY ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY failed_at DESC, stage, error) = 1
  UNION ALL
  SELECT {null_list}, TRUE AS resolved
  FROM (
    SELECT DISTINCT c.image_id FROM {staging_captions} AS c
    WHERE NOT EXISTS (SELECT 1 FROM {staging_dead_letters} AS d WHERE d.image_id = c.image_id)
  ) AS r
) AS S
ON T.image_id = S.image_id
WHEN MATCHED AND S.resolved THEN DELETE
WHEN MATCHED THEN UPDATE SET {update_set}
WHEN NOT MATCHED AND NOT S.resolved THEN INSERT ({column_list}) VALUES ({source_list})
"""

# -- validation -----------------------------------------------------------------------
VALIDATION_COUNTS = """
SELECT
  (SELECT COUNT(*) FROM {manifests} WHERE run_id = @run_id) AS manifest,
  (SELECT COUNT(*) FROM {captions} WHERE run_id = @run_id) AS captioned,
  (SELECT COUNT(*) FROM {dead_letters} WHERE run_id = @run_id) AS dead_lettered
"""

# One row per (problem kind, image id), at most @sample_size ids per kind, each
# with the kind's total. No rows means the run is exactly-once.
VALIDATION_PROBLEMS = """
WITH
  m AS (SELECT image_id FROM {manifests} WHERE run_id = @run_id),
  outcomes AS (
    SELECT image_id, COUNT(*) AS n, COUNTIF(src = 'c') AS nc, COUNTIF(src = 'd') AS nd
    FROM (
      SELECT image_id, 'c' AS src FROM {captions} WHERE run_id = @run_id
      UNION ALL
      SELECT image_id, 'd' AS src FROM {dead_letters} WHERE run_id = @run_id
    ) AS u
    GROUP BY image_id
  ),
  problems AS (
    SELECT 'missing' AS kind, m.image_id FROM m
    WHERE NOT EXISTS (SELECT 1 FROM outcomes AS o WHERE o.image_id = m.image_id)
    UNION ALL
    SELECT 'extra' AS kind, o.image_id FROM outcomes AS o
    WHERE NOT EXISTS (SELECT 1 FROM m WHERE m.image_id = o.image_id)
    UNION ALL
    SELECT 'both' AS kind, image_id FROM outcomes WHERE nc > 0 AND nd > 0
    UNION ALL
    SELECT 'repeated' AS kind, image_id FROM outcomes WHERE n > 1
    UNION ALL
    SELECT 'duplicate_caption' AS kind, image_id FROM {captions}
    GROUP BY image_id HAVING COUNT(*) > 1
    UNION ALL
    SELECT 'duplicate_manifest' AS kind, image_id FROM m
    GROUP BY image_id HAVING COUNT(*) > 1
  )
SELECT kind, image_id, COUNT(*) OVER (PARTITION BY kind) AS total
FROM problems
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY kind ORDER BY image_id) <= @sample_size
ORDER BY kind, image_id
"""

# -- pipeline_runs --------------------------------------------------------------------
REPLACE_RUN = (
    "DELETE FROM {pipeline_runs} WHERE run_id = @run_id",
    "INSERT INTO {pipeline_runs} ({column_list}) VALUES ({param_list})",
)

# The median CLIP cosine similarity of a run's chosen captions (approximate on BigQuery).
RUN_CAPTION_SIMILARITY = """
SELECT APPROX_QUANTILES(caption_similarity, 2)[OFFSET(1)] AS median
FROM {captions} WHERE run_id = @run_id AND caption_similarity IS NOT NULL
"""

FETCH_RUNS = "SELECT * FROM {pipeline_runs} ORDER BY started_at DESC, run_id LIMIT @limit"
FETCH_BENCHMARK_RUNS = """
SELECT * FROM {pipeline_runs} WHERE benchmark_id = @benchmark_id ORDER BY started_at, run_id
"""

DEAD_LETTERS_FOR_RUN = """
SELECT * FROM {dead_letters} WHERE run_id = @run_id ORDER BY image_id
"""

CAPTIONS_FOR_RUN = """
SELECT * FROM {captions} WHERE run_id = @run_id ORDER BY image_id
"""
