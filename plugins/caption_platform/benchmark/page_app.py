"""The app behind the "Captioning performance" page in the Airflow UI.

Draws the per-Beam-SDK-version report (:mod:`caption_platform.benchmark.version_stats`,
charts and tables from :mod:`caption_platform.benchmark.pages`) live from the
``pipeline_runs`` table, filtered by the query string (DAG, run kind, runner, hardware,
model settings). The plugin ``plugins/caption_performance.py`` mounts it under
``/captioning/`` of Airflow's API server and adds the entry "Captioning performance" to the
UI's Browse menu (an external view that the UI shows in a frame at
``/plugin/captioning-performance``).

**Authentication.** Airflow mounts plugin apps without its own authentication, so the page
asks Airflow itself: the route depends on ``requires_access_view(AccessView.WEBSITE)`` and
``get_user`` from ``airflow.api_fastapi.core_api.security``. They read the JWT from the
``Authorization: Bearer`` header or from the UI's ``_token`` cookie and have the configured
auth manager validate it (signature, expiry, revocation): no token or an expired one is
refused with 401 (a browser asking for HTML is sent to the login page instead, and comes
back after logging in), an invalid one with 403, and a user who may not use the UI with
403. The auth manager then says which DAGs the user may read
(``get_authorized_dag_ids(method="GET")``, as Airflow's own DAG-run list asks, each also
``is_authorized_dag(GET, RUN)``), and only those DAGs' runs are read from the warehouse,
the ``limit`` counting them alone: nothing on the page (no row, count, note or chart)
depends on the runs of a DAG the user may not read, so changing ``limit`` cannot locate
another team's runs in the timeline.

**Light to load.** Every Airflow process (scheduler, DAG processor, workers) imports the
plugin file, and so this module, while it looks for plugins: at module level it imports
only the standard library. The FastAPI app is built on the first request
(:class:`LazyASGIApp` and :func:`build_app`); FastAPI, Airflow's API modules, the rest of
the project's library, DuckDB and matplotlib are imported there, in the API server only.

**Filters** are matched in Python over the fetched rows, never written into SQL. A filter is
offered only when ``pipeline_runs`` has its column; its choices are the values present.
"""

# No ``from __future__ import annotations``: FastAPI reads the route's annotations
# (``Request``, ``GetUserDep``, local to build_app) at run time.
import html
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

URL_PREFIX = "/captioning"
VIEW_NAME = "Captioning performance"
#: The UI route that shows the page in a frame (http://HOST/plugin/captioning-performance).
URL_ROUTE = "captioning-performance"

#: Query parameter (= pipeline_runs column) -> label, in the order the form shows them.
FILTERS: dict[str, str] = {
    "dag_id": "DAG",
    "run_kind": "Run kind",
    "benchmark_id": "Benchmark",
    "runner": "Runner",
    "machine_type": "Machine type",
    "gpu_type": "GPU type",
    "blip_model": "BLIP model",
    "clip_model": "CLIP model",
    "num_captions": "Captions per image",
    "decoding": "Decoding",
    "num_beams": "Beams",
    "max_new_tokens": "Max new tokens",
    # the caption recipe's fingerprint (captioning.recipe): models, decoding and numerics
    # together, so runs that made the same captions compare like with like
    "recipe": "Caption recipe",
}
#: Filters whose mixed values still compare like with like (no note about mixing).
UNMIXED_OK = frozenset({"benchmark_id"})
#: Other query parameters: report settings and how many runs to read.
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
DEFAULT_THRESHOLD_PCT = 10.0
SETTINGS_PARAMS = ("baseline", "threshold", "limit")
MAX_VALUE_LENGTH = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadRequest(ValueError):
    """A query parameter the page refuses (answered with 400 and the message)."""


# -- filtering (pure Python, tested without a server) ---------------------------------------
def as_text(value: Any) -> str | None:
    """How a cell is shown and compared with a filter value: 5.0 -> "5", None -> None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if hasattr(value, "isoformat"):
        return value.isoformat()
    text = str(value).strip()
    return text or None


def recipe_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What each caption recipe fingerprint among ``rows`` stands for (from recipe_json)."""
    import json

    from captioning.recipe import describe

    out: dict[str, str] = {}
    for row in rows:
        fingerprint, text = row.get("recipe"), row.get("recipe_json")
        if fingerprint and text and fingerprint not in out:
            try:
                out[str(fingerprint)] = f"{fingerprint} = {describe(json.loads(text))}"
            except (ValueError, TypeError, AttributeError):
                continue
    return [out[k] for k in sorted(out)]


def available_filters(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The filters whose column exists in the rows (``SELECT *``: the table's columns)."""
    columns = set(rows[0]) if rows else set()
    return [name for name in FILTERS if name in columns]


def parse_query(
    items: Iterable[tuple[str, str]],
) -> tuple[dict[str, str], dict[str, str]]:
    """Split and validate the query string: (filters, report settings); empty = unset.

    Raises :class:`BadRequest` for an unknown or repeated parameter, a value longer than
    200 characters or one with control characters. Whether a filter's column exists is
    decided later, against the rows.
    """
    filters: dict[str, str] = {}
    settings: dict[str, str] = {}
    seen: set[str] = set()
    for name, raw in items:
        if name not in FILTERS and name not in SETTINGS_PARAMS:
            known = ", ".join([*FILTERS, *SETTINGS_PARAMS])
            raise BadRequest(f"unknown query parameter {name[:50]!r}; known: {known}")
        if name in seen:
            raise BadRequest(f"query parameter {name!r} is given more than once")
        seen.add(name)
        value = raw.strip()
        if len(value) > MAX_VALUE_LENGTH:
            raise BadRequest(f"{name}: value longer than {MAX_VALUE_LENGTH} characters")
        if _CONTROL.search(value):
            raise BadRequest(f"{name}: value contains control characters")
        if value:
            (filters if name in FILTERS else settings)[name] = value
    return filters, settings


def parse_limit(text: str | None) -> int:
    if not text:
        return DEFAULT_LIMIT
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(f"limit: a whole number from 1 to {MAX_LIMIT}, got {text[:20]!r}")
    return int(text)


def parse_threshold(text: str | None) -> float:
    """The regression threshold in percent (10 = 10%), returned as a fraction (0.1)."""
    if not text:
        return DEFAULT_THRESHOLD_PCT / 100
    try:
        pct = float(text)
    except ValueError:
        pct = -1.0
    if not 0 <= pct <= 1000:  # also refuses nan and inf
        raise BadRequest(f"threshold: a percentage from 0 to 1000, got {text[:20]!r}")
    return pct / 100


def filter_rows(
    rows: Iterable[Mapping[str, Any]], filters: Mapping[str, str]
) -> list[Mapping[str, Any]]:
    """The rows whose every filtered column, shown as text, equals the filter's value."""
    return [r for r in rows if all(as_text(r.get(k)) == v for k, v in filters.items())]


def choices(rows: Iterable[Mapping[str, Any]], column: str) -> list[str]:
    """The distinct values of a column, as text, sorted (numbers numerically)."""
    values = {t for r in rows if (t := as_text(r.get(column))) is not None}

    def key(text: str) -> tuple[int, float, str]:
        try:
            return (0, float(text), text)
        except ValueError:
            return (1, 0.0, text)

    return sorted(values, key=key)


# -- page -----------------------------------------------------------------------------------
_CSS = """
.cp-bar{background:#f6f8fa;border:1px solid #ddd;border-radius:6px;padding:10px 14px;
 margin:0 0 16px}
.cp-bar form{display:flex;flex-wrap:wrap;gap:8px 16px;align-items:flex-end}
.cp-bar label{display:flex;flex-direction:column;font-size:.8em;color:#444}
.cp-bar select,.cp-bar input{font-size:1em;padding:2px 4px;min-width:7em;max-width:22em}
.cp-bar button{padding:4px 14px}.cp-bar .meta{margin:.6em 0 0}
.cp-note{background:#fff8e1;border:1px solid #f0d58c;border-radius:6px;padding:8px 12px}
.cp-empty{font-size:1.1em;padding:14px;border:1px dashed #bbb;border-radius:6px}
"""


def _select(name: str, label: str, options: Sequence[str], chosen: str | None,
            *, any_label: str = "all") -> str:
    esc = html.escape
    items = [f'<option value=""{" selected" if not chosen else ""}>{esc(any_label)}</option>']
    shown = list(options)
    if chosen and chosen not in shown:  # keep an unmatched choice visible
        shown.append(chosen)
    for value in shown:
        sel = " selected" if value == chosen else ""
        items.append(f'<option value="{esc(value)}"{sel}>{esc(value)}</option>')
    return (f'<label>{esc(label)}<select name="{esc(name)}" id="filter-{esc(name)}">'
            f'{"".join(items)}</select></label>')


def filter_bar(
    *, action: str, offered: Sequence[str], options: Mapping[str, Sequence[str]],
    filters: Mapping[str, str], versions: Sequence[str], baseline: str | None,
    threshold: float, limit: int, summary: str, notes: Sequence[str] = (),
) -> str:
    """The filter form (GET, no JavaScript) and what is shown, as an HTML fragment."""
    esc = html.escape
    fields = [_select(n, FILTERS[n], options.get(n, ()), filters.get(n)) for n in offered]
    fields.append(_select("baseline", "Baseline SDK", versions, baseline,
                          any_label="oldest"))
    fields.append(f'<label>Threshold (%)<input type="number" name="threshold" min="0" '
                  f'max="1000" step="any" value="{threshold * 100:g}"></label>')
    fields.append(f'<label>Latest runs<input type="number" name="limit" min="1" '
                  f'max="{MAX_LIMIT}" value="{limit}"></label>')
    note_html = "".join(f'<p class="cp-note">{esc(n)}</p>' for n in notes)
    return (
        f'<div class="cp-bar" id="filters"><form method="get" action="{esc(action)}">'
        f'{"".join(fields)}<button type="submit">Apply</button>'
        f'<a href="{esc(action)}">Reset</a></form>'
        f'<p class="meta" id="shown">{esc(summary)}</p></div>{note_html}'
    )


def page_with_bar(report_html: str, bar: str) -> str:
    """The report page with the filter bar at the top of its body and the bar's styles."""
    page = report_html.replace("</head>", f"<style>{_CSS}</style></head>", 1)
    match = re.search(r"<body[^>]*>", page)
    if match is None:  # not the page we know: still show both
        return f"{bar}{page}"
    return page[: match.end()] + bar + page[match.end():]


def plain_page(title: str, body: str) -> str:
    esc = html.escape
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>"
        "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;"
        f"color:#222}}h1{{font-size:1.4em}}{_CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>{body}</body></html>"
    )


def render_page(
    rows: Sequence[Mapping[str, Any]], query: Iterable[tuple[str, str]], *,
    action: str, source: str,
) -> str:
    """The whole page for the rows the user may see and the query string.

    ``rows``: newest first, as fetched, only of DAGs the user may read (the page says
    nothing about any other row, not even how many there are). Raises
    :class:`BadRequest` for invalid parameters.
    """
    from caption_platform.benchmark.pages import html_page
    from caption_platform.benchmark.version_stats import summarize

    filters, settings = parse_query(query)
    limit = parse_limit(settings.get("limit"))
    threshold = parse_threshold(settings.get("threshold"))
    offered = available_filters(rows)
    notes = []
    missing = [n for n in filters if n not in offered]
    if rows and missing:
        notes.append("Not applied (pipeline_runs has no such column yet): "
                     + ", ".join(f"{n}={filters[n]}" for n in missing))
    applied = {k: v for k, v in filters.items() if k in offered}
    # A filter's choices come from the rows the *other* filters let through, so the
    # choices always lead somewhere.
    options = {n: choices(filter_rows(rows, {k: v for k, v in applied.items() if k != n}), n)
               for n in offered}
    shown = filter_rows(rows, applied)
    report = None
    baseline = settings.get("baseline")
    if shown:
        try:
            report = summarize(shown, baseline=baseline, threshold=threshold)
        except ValueError:  # a baseline that none of the shown runs has
            notes.append(f"Baseline {baseline} has no runs among those shown: the oldest "
                         "version is the baseline.")
            report = summarize(shown, threshold=threshold)
        baseline = report.baseline if baseline else None
    versions = [v.version for v in report.versions] if report else []
    mixed = [FILTERS[n] for n in offered
             if n not in applied and n not in UNMIXED_OK
             and len({as_text(r.get(n)) for r in shown}) > 1]  # None counts: no GPU
    if mixed:
        notes.append("The runs shown mix several values of: " + ", ".join(mixed) + ". "
                     "Choose one of each to compare Beam SDK versions like with like.")
    if recipes := recipe_notes(shown):
        notes.append("Caption recipes shown: " + "; ".join(recipes) + ".")
    described = ", ".join(f"{FILTERS[k]} = {v}" for k, v in applied.items()) or "none"
    summary = (f"{len(shown)} of the latest {len(rows)} run(s) in {source} "
               f"(read at most {limit}); filters: {described}.")
    bar = filter_bar(action=action, offered=offered, options=options, filters=applied,
                     versions=versions, baseline=baseline, threshold=threshold, limit=limit,
                     summary=summary, notes=notes)
    if not rows:
        return plain_page(VIEW_NAME, bar + (
            '<p class="cp-empty" id="no-runs">No pipeline runs are recorded yet for the DAGs '
            "whose runs you may read. Runs of the caption_images and benchmark_beam_sdks "
            "DAGs appear here once their record_metrics task has run.</p>"))
    if report is None:
        return plain_page(VIEW_NAME, bar + (
            '<p class="cp-empty" id="no-runs">No runs match these filters. '
            f'<a href="{html.escape(action)}">Show all runs</a>.</p>'))
    return page_with_bar(html_page(report, shown), bar)


# -- the app ----------------------------------------------------------------------------------
def _read_runs(limit: int, dag_ids: Iterable[str]) -> tuple[list[dict[str, Any]], str]:
    """(the latest ``limit`` pipeline_runs rows of ``dag_ids``, newest first, where they came
    from); no rows when none exist."""
    from pathlib import Path

    from caption_platform.config import load_settings
    from caption_platform.warehouse import get_warehouse

    settings = load_settings()
    table = settings.tables.pipeline_runs
    if settings.warehouse == "duckdb":
        source = f"DuckDB table {table}"
        path = str(settings.duckdb_path).removeprefix("file://")
        if path != ":memory:" and not Path(path).exists():  # never create an empty file
            return [], source
    else:
        source = f"BigQuery table {settings.gcp_project}.{settings.bq_dataset}.{table}"
    try:
        return get_warehouse(settings).fetch_runs(limit, dag_ids=dag_ids), source
    except Exception as exc:
        if _missing_table(exc):
            return [], source
        raise


def _missing_table(exc: Exception) -> bool:
    text = str(exc).lower()
    return ("does not exist" in text and "table" in text) or "not found: table" in text


def readable_dag_ids(user: Any) -> set[str]:
    """The DAGs whose runs ``user`` may read, as Airflow's auth manager says: the DAGs it
    may read (``get_authorized_dag_ids``, what Airflow's own DAG-run list filters on) whose
    runs it may read too (``is_authorized_dag(GET, RUN)``, with the DAG's team when
    Airflow runs several teams). Asked before any row is read."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import (
        DagAccessEntity,
        DagDetails,
    )
    from airflow.configuration import conf

    manager = get_auth_manager()
    dag_ids = set(manager.get_authorized_dag_ids(user=user, method="GET"))
    teams: Mapping[str, str | None] = {}
    if dag_ids and conf.getboolean("core", "multi_team", fallback=False):
        from airflow.models.dag import DagModel

        teams = DagModel.get_dag_id_to_team_name_mapping(sorted(dag_ids))
    return {d for d in dag_ids if manager.is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN,
        details=DagDetails(id=d, team_name=teams.get(d)), user=user)}


def build_app() -> Any:
    """The FastAPI app of the page (imports FastAPI and Airflow's security module)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title=VIEW_NAME, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def not_logged_in(request: Request, exc: HTTPException) -> Any:
        """A browser without a (valid, unexpired) login goes to Airflow's login page."""
        wants_html = "text/html" in request.headers.get("accept", "")
        if exc.status_code == 401 and wants_html and "authorization" not in request.headers:
            from airflow.api_fastapi.app import get_auth_manager

            login = get_auth_manager().get_url_login(next_url=str(request.url))
            return RedirectResponse(login, status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/", response_class=HTMLResponse,
             dependencies=[Depends(requires_access_view(AccessView.WEBSITE))])
    def performance_page(request: Request, user: GetUserDep) -> HTMLResponse:
        started = time.monotonic()
        query = list(request.query_params.multi_items())
        action = f"{request.scope.get('root_path', '')}/"
        try:
            _, settings = parse_query(query)
            limit = parse_limit(settings.get("limit"))
        except BadRequest as exc:
            return _bad_request(action, str(exc))
        # only the runs of DAGs the user may read are read at all: the limit, the counts
        # and every chart depend on nothing else
        readable = readable_dag_ids(user)
        try:
            rows, source = _read_runs(limit, readable)
        except Exception as exc:
            log.exception("captioning performance page: reading pipeline_runs failed")
            return HTMLResponse(plain_page(VIEW_NAME, (
                '<p class="cp-empty" id="error">The runs could not be read from the '
                f"warehouse: {html.escape(type(exc).__name__)}: "
                f"{html.escape(str(exc)[:500])}</p>")), status_code=503)
        try:
            page = render_page(rows, query, action=action, source=source)
        except BadRequest as exc:
            return _bad_request(action, str(exc))
        log.info("captioning performance page: %d run(s) in %.2fs", len(rows),
                 time.monotonic() - started)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    def _bad_request(action: str, message: str) -> HTMLResponse:
        return HTMLResponse(plain_page(VIEW_NAME, (
            f'<p class="cp-note" id="bad-request">{html.escape(message)}</p>'
            f'<p><a href="{html.escape(action)}">Show all runs</a></p>')), status_code=400)

    return app


class LazyASGIApp:
    """An ASGI app that builds the real one (``factory()``) on its first request.

    Airflow's API server mounts it like any FastAPI app; processes that only load plugins
    never import FastAPI, the warehouse or the report's modules.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._app: Any = None
        self._lock = threading.Lock()

    @property
    def app(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = self._factory()
        return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
