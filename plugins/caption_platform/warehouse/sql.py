"""Every warehouse SQL statement, written once in BigQuery standard SQL.

Placeholders in braces are table references only, filled in by the warehouse
engine after ``validate_identifier`` and quoting; column lists come from the
column declarations (``tables.py``); values are always query parameters
(``@name``). The DuckDB engine runs the same text transpiled by sqlglot, so the
tests execute this logic for real.

Cost follows the run (docs/ARCHITECTURE.md "Scale"): every statement over one run's rows of a
run-partitioned table (``tables.RUN_PARTITIONED``) names its partition, ``run_date =
@run_date``, beside ``run_id = @run_id`` (tests/plugins/warehouse/test_sql_partitions.py reads
this module for it); the statements over the current-state tables (``captions``,
``dead_letters``) touch the ids the run staged or published, except the whole-table checks.
"""

from __future__ import annotations

CREATE_TABLE = "CREATE TABLE IF NOT EXISTS {table} ({column_defs}){layout}"
ADD_COLUMN = "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {type}"
# Every table's columns ({columns}: the engine's INFORMATION_SCHEMA.COLUMNS view).
TABLE_COLUMNS = "SELECT table_name, column_name FROM {columns}"
# BigQuery: the same, with how the tables are laid out (partitioning, clustering order).
TABLE_LAYOUT = ("SELECT table_name, column_name, is_partitioning_column, "
                "clustering_ordinal_position FROM {columns}")
# BigQuery table option appended to CREATE_TABLE for per-run staging tables ({hours}: an int).
EXPIRES_IN_HOURS = (
    " OPTIONS (expiration_timestamp = TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL {hours} HOUR))"
)

# Older releases' tables: run_date filled from the run ids (tables.run_date's rule, in SQL).
FILL_RUN_DATE = """
UPDATE {table} SET run_date = CASE
  WHEN REGEXP_CONTAINS(run_id, r'\\d{{4}}-\\d{{2}}-\\d{{2}}T\\d{{2}}')
  THEN PARSE_DATE('%Y-%m-%d', LEFT(REGEXP_EXTRACT(run_id, r'\\d{{4}}-\\d{{2}}-\\d{{2}}T\\d{{2}}'), 10))
  ELSE DATE '1970-01-01' END
WHERE run_date IS NULL
"""
# BigQuery: an unpartitioned table of an older release, re-created partitioned, every row kept.
REPARTITION = "CREATE OR REPLACE TABLE {table} {layout} AS SELECT * FROM {table}"

# -- manifests ------------------------------------------------------------------------
# Idempotent per run: the run's rows are replaced, never appended twice.
REPLACE_MANIFEST = (
    "DELETE FROM {manifests} WHERE run_date = @run_date AND run_id = @run_id",
    """
    INSERT INTO {manifests} (run_id, run_date, image_id, uri, size_bytes)
    SELECT @run_id, @run_date, image_id, uri, CAST(size_bytes AS INT64) FROM {staging_manifest}
    """,
)

# -- skipped_files ---------------------------------------------------------------------
# The files a run's manifest left out (its skipped.jsonl), replaced per run like the manifest.
REPLACE_SKIPPED = (
    "DELETE FROM {skipped_files} WHERE run_date = @run_date AND run_id = @run_id",
    """
    INSERT INTO {skipped_files}
      (run_id, run_date, uri, reason, detail, size_bytes, image_id, duplicate_of)
    SELECT @run_id, @run_date, uri, reason, detail, CAST(size_bytes AS INT64), image_id,
      duplicate_of
    FROM {staging_skipped}
    """,
)

# How many of the run's rows a table holds (after a load).
RUN_ROWS = "SELECT COUNT(*) AS n FROM {table} WHERE run_date = @run_date AND run_id = @run_id"

# The run's skipped files per reason: the count, and the first @per_reason by URI.
SKIPPED_SAMPLE = """
SELECT reason, uri, detail, duplicate_of, COUNT(*) OVER (PARTITION BY reason) AS total
FROM {skipped_files}
WHERE run_date = @run_date AND run_id = @run_id
QUALIFY ROW_NUMBER() OVER (PARTITION BY reason ORDER BY uri) <= @per_reason
ORDER BY reason, uri
"""

SKIPPED_FOR_RUN = """
SELECT * FROM {skipped_files} WHERE run_date = @run_date AND run_id = @run_id
ORDER BY uri, reason
"""

# Images captioned by other runs: a retried or re-triggered run keeps its own manifest.
EXISTING_IMAGE_IDS = "SELECT image_id FROM {captions} WHERE run_id != @run_id"

# Each image's newest outcome published by any run but @run_id, from the ledger (the
# captions/dead_letters rule: newest wins, a dead letter at an equal instant), with the
# recipe it had, and how many times it was dead-lettered since its last caption. Leaving
# this run out, a retried or re-triggered run finds the outcomes it found the first time,
# even after it replaced them. {only}: the images to look at (a WHERE on image_id).
# An outcome is never newer than its publication: one dated after it (a clock ahead, a
# rewritten staging row) counts as of its published_at, so it cannot outrank later outcomes.
_OUTCOMES = """
SELECT image_id, outcome, recipe, outcome_at,
  SUM(CASE WHEN outcome = 'dead_lettered' AND (last_caption_at IS NULL
                                              OR outcome_at > last_caption_at)
           THEN 1 ELSE 0 END) OVER (PARTITION BY image_id) AS failures
FROM (
  SELECT image_id, outcome, recipe, outcome_at, run_id,
    MAX(CASE WHEN outcome = 'captioned' THEN outcome_at END)
      OVER (PARTITION BY image_id) AS last_caption_at
  FROM (
    SELECT image_id, outcome, recipe, run_id,
      CASE WHEN outcome_at > published_at THEN published_at ELSE outcome_at END AS outcome_at
    FROM {published_images}
    WHERE run_id != @run_id AND {only}
  ) AS e
) AS h
QUALIFY ROW_NUMBER() OVER (
  PARTITION BY image_id
  ORDER BY outcome_at DESC, CASE WHEN outcome = 'dead_lettered' THEN 0 ELSE 1 END, run_id DESC
) = 1
"""
# Every image the ledger knows (a whole-history read: tests and tools only, never a run).
KNOWN_OUTCOMES = _OUTCOMES.replace("{only}", "TRUE")

# -- the selection of an incremental run ----------------------------------------------
# The run's unique listed images ({staging_listing}: image_id, uri, size_bytes), each judged
# against its newest outcome by other runs (the ledger, those images only): the status, then
# the decision. Dead letters are retried after a backoff (@retry_base_s x 2^(failures-1)
# since the last failure, the clock @now) until @max_attempts failures; captions of another
# recipe are kept (@policy keep) or re-captioned oldest first, at most @budget of them and at
# most @max_total images in the run with the first tries (NULL: no such limit); what is taken
# is capped at @max_images (NULL: none) in URI order.
SELECT_IMAGES = (
    """
    CREATE OR REPLACE TABLE {selection}{expiry} AS
    WITH
      k AS (""" + _OUTCOMES.replace(
        "{only}", "image_id IN (SELECT image_id FROM {staging_listing})") + """),
      judged AS (
        SELECT l.image_id, l.uri, l.size_bytes, k.outcome_at, k.failures,
          CASE WHEN k.image_id IS NULL OR NOT @incremental THEN 'new'
               WHEN k.outcome = 'dead_lettered' AND k.failures >= @max_attempts
                 THEN 'given_up'
               WHEN k.outcome = 'dead_lettered'
                    AND TIMESTAMP_DIFF(@now, k.outcome_at, SECOND)
                        < @retry_base_s * POW(2, LEAST(k.failures, 30) - 1)
                 THEN 'retry_later'
               WHEN k.outcome = 'dead_lettered' THEN 'retried'
               WHEN @recipe = '' OR k.recipe = @recipe THEN 'done'
               ELSE 'stale' END AS status
        FROM {staging_listing} AS l LEFT JOIN k ON k.image_id = l.image_id
      ),
      ranked AS (
        SELECT *, ROW_NUMBER() OVER (PARTITION BY status
                                     ORDER BY outcome_at NULLS FIRST, image_id) AS age_rank,
          SUM(CASE WHEN status IN ('new', 'retried') THEN 1 ELSE 0 END) OVER ()
            AS first_tries
        FROM judged
      ),
      decided AS (
        SELECT image_id, uri, size_bytes, status, failures, outcome_at,
          CASE WHEN status IN ('new', 'retried') THEN 'take'
               WHEN status IN ('given_up', 'retry_later') THEN status
               WHEN status = 'done' THEN 'skipped_existing'
               WHEN @policy = 'keep' THEN 'other_recipe'
               WHEN (@budget IS NULL OR age_rank <= @budget)
                    AND (@max_total IS NULL OR age_rank <= @max_total - first_tries) THEN 'take'
               ELSE 'over_budget' END AS decision
        FROM ranked
      )
    SELECT image_id, uri, size_bytes, status, failures, outcome_at,
      CASE WHEN decision = 'take' AND @max_images IS NOT NULL
                AND ROW_NUMBER() OVER (PARTITION BY decision ORDER BY uri) > @max_images
           THEN 'capped' ELSE decision END AS decision
    FROM decided
    """,
)
SELECTION_COUNTS = """
SELECT decision, status, COUNT(*) AS n FROM {selection} GROUP BY decision, status
"""
# The manifest: what the run takes, in URI order.
SELECTION_TAKEN = """
SELECT image_id, uri, size_bytes FROM {selection} WHERE decision = 'take' ORDER BY uri
"""
# Dead letters left out (given up, or waiting for their retry): named in skipped_files.
SELECTION_HELD = """
SELECT uri, decision AS reason, failures, outcome_at, size_bytes, image_id FROM {selection}
WHERE decision IN ('given_up', 'retry_later') ORDER BY uri
"""

# -- publish --------------------------------------------------------------------------
STAGED_COUNTS = """
SELECT
  (SELECT COUNT(*) FROM {staging_captions}) AS captions_staged,
  (SELECT COUNT(*) FROM {staging_dead_letters}) AS dead_letters_staged,
  (SELECT COUNT(*) FROM {staging_captions}
   WHERE TIMESTAMP_DIFF(captioned_at, @published_at, SECOND) > @skew_s)
  + (SELECT COUNT(*) FROM {staging_dead_letters}
     WHERE TIMESTAMP_DIFF(failed_at, @published_at, SECOND) > @skew_s) AS dated_ahead
"""

# One rule for both tables: each image's NEWEST outcome wins (captioned_at vs failed_at);
# at an equal instant, and within one run, the dead letter wins. So an image is never both
# captioned and dead-lettered, whichever order runs (or reruns of old runs) publish in.
# Each source is de-duplicated on image_id (MERGE must match at most one source row).
# No outcome is newer than its publish (@published_at, the publish task's clock): a staged
# row dated later is stored dated @published_at (base.merge_lists), and a current row dated
# after @published_at (left by an older release, or edited by hand) is taken for the oldest,
# so any outcome replaces it: a date in the future never sticks.

# How many staged rows the tables already hold an outcome for (image_id only: cheap; joins
# from the staged side, so an engine hashes the run's rows, not the table's; each table read
# once): with none, publishing is two INSERTs of new ids; else the MERGEs below.
STAGED_KNOWN = """
WITH staged AS (
  SELECT image_id FROM {staging_captions}
  UNION ALL SELECT image_id FROM {staging_dead_letters}
)
SELECT
  (SELECT COUNT(*) FROM staged AS s JOIN {captions} AS c ON c.image_id = s.image_id)
  + (SELECT COUNT(*) FROM staged AS s JOIN {dead_letters} AS d ON d.image_id = s.image_id)
  AS known
"""

# The staged captions that may win: not dead-lettered in this run, not older than a dead
# letter the table has, one per image.
_CAPTIONS_SOURCE = """
  SELECT * FROM {staging_captions} AS s
  WHERE NOT EXISTS (SELECT 1 FROM {staging_dead_letters} AS sd WHERE sd.image_id = s.image_id)
    AND NOT EXISTS (
      SELECT 1 FROM {dead_letters} AS d
      WHERE d.image_id = s.image_id AND d.failed_at >= LEAST(s.captioned_at, @published_at)
        AND d.failed_at <= @published_at)
  QUALIFY ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY captioned_at DESC, uri) = 1
"""
# The staged dead letters that may win: not older than a caption the table has, one per image
# (a join from the staged side: an engine hashes the run's few dead letters, not captions).
_DEAD_LETTERS_SOURCE = """
  SELECT s.* FROM {staging_dead_letters} AS s
  LEFT JOIN {captions} AS c ON c.image_id = s.image_id
    AND c.captioned_at > LEAST(s.failed_at, @published_at) AND c.captioned_at <= @published_at
  WHERE c.image_id IS NULL
  QUALIFY ROW_NUMBER() OVER (
    PARTITION BY s.image_id ORDER BY s.failed_at DESC, s.stage, s.error) = 1
"""

# Insert new images, update ones whose current caption is older; a rerun changes nothing.
MERGE_CAPTIONS = """
MERGE {captions} AS T
USING (""" + _CAPTIONS_SOURCE + """) AS S
ON T.image_id = S.image_id
WHEN MATCHED AND (LEAST(S.captioned_at, @published_at) >= T.captioned_at
                  OR T.captioned_at > @published_at) THEN UPDATE SET {update_set}
WHEN NOT MATCHED THEN INSERT ({column_list}) VALUES ({source_list})
"""

# dead_letters is keyed on image_id and keeps each image's latest failure, unless the
# image has a newer caption.
MERGE_DEAD_LETTERS = """
MERGE {dead_letters} AS T
USING (""" + _DEAD_LETTERS_SOURCE + """) AS S
ON T.image_id = S.image_id
WHEN MATCHED AND (LEAST(S.failed_at, @published_at) >= T.failed_at
                  OR T.failed_at > @published_at) THEN UPDATE SET {update_set}
WHEN NOT MATCHED THEN INSERT ({column_list}) VALUES ({source_list})
"""

# When no staged image is in the tables yet (the daily run of new images): the same outcome
# as the MERGEs, reading only the tables' image_id (a MERGE reads every column it may update).
INSERT_NEW_CAPTIONS = """
INSERT INTO {captions} ({column_list})
SELECT {source_list} FROM (""" + _CAPTIONS_SOURCE + """) AS S
"""
INSERT_NEW_DEAD_LETTERS = """
INSERT INTO {dead_letters} ({column_list})
SELECT {source_list} FROM (""" + _DEAD_LETTERS_SOURCE + """) AS S
"""

# After both MERGEs: the older of an image's caption and dead letter goes (both ways), for
# the images this publish staged (only they can have changed); one dated after
# @published_at counts as the oldest.
RESOLVE_OUTCOMES = (
    """
    DELETE FROM {dead_letters} AS d
    WHERE d.image_id IN (SELECT image_id FROM {staging_captions}
                         UNION ALL SELECT image_id FROM {staging_dead_letters}) AND EXISTS (
      SELECT 1 FROM {captions} AS c
      WHERE c.image_id = d.image_id AND c.captioned_at <= @published_at
        AND (c.captioned_at > d.failed_at OR d.failed_at > @published_at))
    """,
    """
    DELETE FROM {captions} AS c
    WHERE c.image_id IN (SELECT image_id FROM {staging_dead_letters}
                         UNION ALL SELECT image_id FROM {staging_captions}) AND EXISTS (
      SELECT 1 FROM {dead_letters} AS d
      WHERE d.image_id = c.image_id AND d.failed_at <= @published_at
        AND (d.failed_at >= c.captioned_at OR c.captioned_at > @published_at))
    """,
)

# The provenance ledger: what THIS run published, replaced per run (a re-published run
# replaces its own rows), never relabelled by later runs. Same in-run rule as above.
# outcome_at is as the job stamped it (validation flags one dated after published_at;
# whatever orders outcomes takes the earlier of the two).
RECORD_PUBLISHED = (
    "DELETE FROM {published_images} WHERE run_date = @run_date AND run_id = @run_id",
    """
    INSERT INTO {published_images}
      (run_id, run_date, image_id, outcome, outcome_at, published_at, recipe, caption)
    SELECT @run_id, @run_date, image_id, outcome, outcome_at, @published_at, recipe,
      caption FROM (
      SELECT image_id, 'dead_lettered' AS outcome, failed_at AS outcome_at, recipe,
        CAST(NULL AS STRING) AS caption
      FROM {staging_dead_letters}
      WHERE TRUE
      QUALIFY ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY failed_at DESC, stage, error) = 1
      UNION ALL
      SELECT image_id, 'captioned' AS outcome, captioned_at AS outcome_at, recipe, caption
      FROM {staging_captions} AS s
      WHERE NOT EXISTS (SELECT 1 FROM {staging_dead_letters} AS sd WHERE sd.image_id = s.image_id)
      QUALIFY ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY captioned_at DESC, uri) = 1
    ) AS p
    """,
)

# Tables an older release filled before the ledger existed: each current row is what its
# run published (run once, when ensure_tables creates the ledger).
BACKFILL_PUBLISHED = """
INSERT INTO {published_images}
  (run_id, image_id, outcome, outcome_at, published_at, recipe, caption)
SELECT run_id, image_id, 'captioned', captioned_at, CURRENT_TIMESTAMP(), recipe, caption
FROM {captions}
UNION ALL
SELECT run_id, image_id, 'dead_lettered', failed_at, CURRENT_TIMESTAMP(), recipe,
  CAST(NULL AS STRING)
FROM {dead_letters}
"""

# -- validation -----------------------------------------------------------------------
# A run is checked against its own ledger rows, so later runs that re-caption (relabel) or
# dead-letter its images never make an old run's validation fail.
VALIDATION_COUNTS = """
SELECT
  (SELECT COUNT(*) FROM {manifests} WHERE run_date = @run_date AND run_id = @run_id) AS manifest,
  (SELECT COUNT(*) FROM {published_images}
   WHERE run_date = @run_date AND run_id = @run_id AND outcome = 'captioned') AS captioned,
  (SELECT COUNT(*) FROM {published_images}
   WHERE run_date = @run_date AND run_id = @run_id AND outcome = 'dead_lettered') AS dead_lettered
"""

# One row per (problem kind, image id), at most @sample_size ids per kind, each with the
# kind's total. No rows means the run is exactly-once AND the tables are consistent: for the
# images this run published ({scope} the ids it published, {mine} its own current rows), or
# for every row (VALIDATION_PROBLEMS_WHOLE: the whole-table check, on its own schedule).
_VALIDATION_PROBLEMS = """
WITH
  m AS (SELECT image_id FROM {manifests} WHERE run_date = @run_date AND run_id = @run_id),
  p AS (SELECT image_id, outcome, recipe, outcome_at, published_at,
          CASE WHEN outcome_at > published_at THEN published_at ELSE outcome_at END
            AS effective_at
        FROM {published_images}
        WHERE run_date = @run_date AND run_id = @run_id),
  c AS (SELECT image_id, run_id, recipe, caption, captioned_at FROM {captions} WHERE {scope}),
  d AS (SELECT image_id, run_id, failed_at FROM {dead_letters} WHERE {scope}),
  l AS (SELECT run_id, image_id, outcome, recipe, caption FROM {published_images}
        WHERE {mine}),
  problems AS (
    -- this run, against its own manifest and ledger
    SELECT 'missing' AS kind, m.image_id FROM m
    WHERE NOT EXISTS (SELECT 1 FROM p WHERE p.image_id = m.image_id)
    UNION ALL
    SELECT 'extra' AS kind, p.image_id FROM p
    WHERE NOT EXISTS (SELECT 1 FROM m WHERE m.image_id = p.image_id)
    UNION ALL
    SELECT 'repeated' AS kind, image_id FROM p GROUP BY image_id HAVING COUNT(*) > 1
    UNION ALL
    -- every outcome of this run has the recipe it was planned with (@recipe: '' unknown)
    SELECT 'wrong_recipe' AS kind, p.image_id FROM p
    WHERE @recipe != '' AND COALESCE(p.recipe, '') != @recipe
    UNION ALL
    SELECT 'duplicate_manifest' AS kind, image_id FROM m
    GROUP BY image_id HAVING COUNT(*) > 1
    UNION ALL
    SELECT 'unaccounted' AS kind, p.image_id FROM p
    WHERE NOT EXISTS (SELECT 1 FROM c WHERE c.image_id = p.image_id)
      AND NOT EXISTS (SELECT 1 FROM d WHERE d.image_id = p.image_id)
    UNION ALL
    -- an outcome dated after the run published it (@skew_s: the clocks' allowed drift)
    SELECT 'dated_ahead' AS kind, p.image_id FROM p
    WHERE TIMESTAMP_DIFF(p.outcome_at, p.published_at, SECOND) > @skew_s
    UNION ALL
    -- each outcome of the run is current, or a newer outcome (another run's) replaced it
    SELECT 'stale' AS kind, p.image_id FROM p
    WHERE (EXISTS (SELECT 1 FROM c WHERE c.image_id = p.image_id)
           OR EXISTS (SELECT 1 FROM d WHERE d.image_id = p.image_id))
      AND NOT EXISTS (
        SELECT 1 FROM c WHERE c.image_id = p.image_id AND (
          (c.run_id = @run_id AND p.outcome = 'captioned')
          OR (c.run_id != @run_id AND (c.captioned_at > p.effective_at
              OR (c.captioned_at = p.effective_at AND p.outcome = 'captioned')))))
      AND NOT EXISTS (
        SELECT 1 FROM d WHERE d.image_id = p.image_id AND (
          (d.run_id = @run_id AND p.outcome = 'dead_lettered')
          OR (d.run_id != @run_id AND d.failed_at >= p.effective_at)))
    UNION ALL
    -- the tables, for the images in scope
    SELECT 'duplicate_caption' AS kind, image_id FROM c
    GROUP BY image_id HAVING COUNT(*) > 1
    UNION ALL
    SELECT 'duplicate_dead_letter' AS kind, image_id FROM d
    GROUP BY image_id HAVING COUNT(*) > 1
    UNION ALL
    SELECT 'both' AS kind, c.image_id FROM c
    WHERE EXISTS (SELECT 1 FROM d WHERE d.image_id = c.image_id)
    UNION ALL
    SELECT 'unproven' AS kind, c.image_id FROM c
    WHERE {own_c} NOT EXISTS (
      SELECT 1 FROM l
      WHERE l.run_id = c.run_id AND l.image_id = c.image_id AND l.outcome = 'captioned')
    UNION ALL
    -- a current row carries the recipe its run published it with
    SELECT 'recipe_mismatch' AS kind, c.image_id FROM c
    JOIN l ON l.run_id = c.run_id AND l.image_id = c.image_id AND l.outcome = 'captioned'
    WHERE COALESCE(c.recipe, '') != COALESCE(l.recipe, '')
    UNION ALL
    -- ... and the caption text its run published
    SELECT 'caption_mismatch' AS kind, c.image_id FROM c
    JOIN l ON l.run_id = c.run_id AND l.image_id = c.image_id AND l.outcome = 'captioned'
    WHERE COALESCE(c.caption, '') != COALESCE(l.caption, '')
    UNION ALL
    -- no current row is dated in the future (@not_after: now plus the allowed drift)
    SELECT 'future_row' AS kind, c.image_id FROM c WHERE c.captioned_at > @not_after
    UNION ALL
    SELECT 'future_row' AS kind, d.image_id FROM d WHERE d.failed_at > @not_after
    UNION ALL
    SELECT 'unproven' AS kind, d.image_id FROM d
    WHERE {own_d} NOT EXISTS (
      SELECT 1 FROM l
      WHERE l.run_id = d.run_id AND l.image_id = d.image_id AND l.outcome = 'dead_lettered')
  )
SELECT kind, image_id, COUNT(*) OVER (PARTITION BY kind) AS total
FROM problems
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY kind ORDER BY image_id) <= @sample_size
ORDER BY kind, image_id
"""
# Per run: the images it published; its own current rows are proven by its own ledger
# partition (a current row another run wrote is that run's to prove).
VALIDATION_PROBLEMS = (
    _VALIDATION_PROBLEMS
    .replace("{scope}", "image_id IN (SELECT image_id FROM {published_images} "
                        "WHERE run_date = @run_date AND run_id = @run_id)")
    .replace("{mine}", "run_date = @run_date AND run_id = @run_id")
    .replace("{own_c}", "c.run_id = @run_id AND")
    .replace("{own_d}", "d.run_id = @run_id AND")
)
# Every row of the tables (and the run's own proof): a whole-history read.
VALIDATION_PROBLEMS_WHOLE = (
    _VALIDATION_PROBLEMS.replace("{scope}", "TRUE").replace("{mine}", "TRUE")
    .replace("{own_c}", "").replace("{own_d}", "")
)

# One caption row's digest (captioning.sinks.caption_digest, the job's side): the first 32
# bits of MD5(image_id|recipe|caption) as an integer; {row}: the row's alias.
CAPTION_DIGEST = (
    "CAST(CONCAT('0x', SUBSTR(TO_HEX(MD5(CONCAT({row}.image_id, '|', COALESCE({row}.recipe, ''),"
    " '|', COALESCE({row}.caption, '')))), 1, 8)) AS INT64)"
)
# The captions the run published (its ledger), counted and checksummed as the job does over
# what it wrote (run_summary.json "written"): equal sums prove the same texts.
PUBLISHED_CAPTIONS_DIGEST = """
SELECT COUNT(*) AS captions, SUM(""" + CAPTION_DIGEST.format(row="p") + """) AS checksum
FROM {published_images} AS p
WHERE p.run_date = @run_date AND p.run_id = @run_id AND p.outcome = 'captioned'
"""

# The run's dead letters by reason: stage, the error's exception class (the job writes
# "Type: message", inference errors as "BLIP: Type: message"), and whether a different run
# had already dead-lettered the image (a known-bad file tried again, not a new failure).
DEAD_LETTER_REASONS = """
WITH r AS (
  SELECT d.stage,
    REGEXP_EXTRACT(d.error, r'^(?:[A-Z]+: )?([A-Za-z_][A-Za-z0-9_.]*)') AS kind,
    EXISTS (
      SELECT 1 FROM {published_images} AS e
      WHERE e.image_id = p.image_id AND e.run_id != p.run_id AND e.outcome = 'dead_lettered'
    ) AS seen_before
  FROM {published_images} AS p
  JOIN {dead_letters} AS d ON d.image_id = p.image_id AND d.run_id = p.run_id
  WHERE p.run_date = @run_date AND p.run_id = @run_id AND p.outcome = 'dead_lettered'
)
SELECT stage, kind, seen_before, COUNT(*) AS n
FROM r
GROUP BY stage, kind, seen_before
ORDER BY n DESC, stage, kind, seen_before
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
# The runs of some DAGs only (@dag_ids: ARRAY<STRING>), the limit counting those alone.
FETCH_RUNS_OF_DAGS = """
SELECT * FROM {pipeline_runs} WHERE dag_id IN UNNEST(@dag_ids)
ORDER BY started_at DESC, run_id LIMIT @limit
"""
FETCH_BENCHMARK_RUNS = """
SELECT * FROM {pipeline_runs} WHERE benchmark_id = @benchmark_id ORDER BY started_at, run_id
"""

DEAD_LETTERS_FOR_RUN = """
SELECT * FROM {dead_letters} WHERE run_id = @run_id ORDER BY image_id
"""

# What the export needs of the run's captions (not the candidates): clustered by run_id,
# BigQuery reads the run's blocks only.
EXPORT_ROWS_FOR_RUN = """
SELECT image_id, uri, caption, caption_score FROM {captions} WHERE run_id = @run_id
ORDER BY image_id
"""

CAPTIONS_FOR_RUN = """
SELECT * FROM {captions} WHERE run_id = @run_id ORDER BY image_id
"""
