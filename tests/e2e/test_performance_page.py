"""The "Captioning performance" page (plugins/caption_performance.py) in Airflow's own
api-server: refused without a login, drawn from pipeline_runs with one, and loaded in
headless Chromium, alone and inside Airflow's UI, with the screenshots kept.

One api-server (SQLite metadata DB, our plugins folder, a DAGs folder declaring the two DAGs
whose runs are recorded) serves the module's tests; its auth manager is SimpleAuthManager
with known passwords, except that the user ``outsider`` may not read the DAG
``caption_images`` (as another team's DAG would be to it). A DuckDB warehouse with known
pipeline_runs rows (three SDK versions, three runs each, plus two runs of the caption DAG,
interleaved with them in time, on another runner) is the page's source. Everything listens on 127.0.0.1; every wait is bounded; every process
group started here is ended.

The browser is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe``
(NUL-separated JSON on file descriptors 3 and 4: the standard library is enough, no driver,
no websocket client): the browser opens the page, is sent to Airflow's own login page, signs
in there (which sets the UI's ``_token`` cookie) and comes back; the test checks that the
charts decoded and the tables are there and saves screenshots under pytest's tmp folder
(their paths are printed; with CAPTION_TEST_ARTIFACTS=DIR a copy goes there too). Without a
browser that part skips; `apt-get install -y chromium` (as .ci/run does) or
CAPTION_TEST_CHROMIUM=/path/to/chrome enables it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from airflow_services import free_port, tail, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGINS = REPO_ROOT / "plugins"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)
PAGE = "/captioning/"
#: A user who may read the benchmark's runs but not the caption DAG's.
OUTSIDER, HIDDEN_DAG = "outsider", "caption_images"
#: The deployment's DAGs (the auth manager answers for the DAGs Airflow knows).
DAGS_FILE = """
from airflow.sdk import DAG

caption_images = DAG("caption_images", schedule=None)
benchmark_beam_sdks = DAG("benchmark_beam_sdks", schedule=None)
"""
#: SimpleAuthManager, except that some users may not read some DAGs.
AUTH_MANAGER_MODULE = f"""
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

HIDDEN = {{{OUTSIDER!r}: {{{HIDDEN_DAG!r}}}}}


class SomeDagsHiddenAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        if details is not None and details.id in HIDDEN.get(user.get_name(), ()):
            return False
        return super().is_authorized_dag(method=method, user=user,
                                         access_entity=access_entity, details=details)
"""

# Known runs: (version, runtime_s, images_per_s, cost_per_1k_images_usd) x 3 repetitions.
# 2.77.0 is 40% slower than 2.76.0 and outside its range: a flagged regression.
BENCHMARK = {
    "2.75.0": [(100.0, 1.00, 0.50), (110.0, 0.91, 0.55), (120.0, 0.83, 0.60)],
    "2.76.0": [(95.0, 1.05, 0.48), (100.0, 1.00, 0.50), (105.0, 0.95, 0.52)],
    "2.77.0": [(130.0, 0.77, 0.65), (140.0, 0.71, 0.70), (150.0, 0.67, 0.75)],
}


def chromium_binary() -> str | None:
    for candidate in (os.environ.get("CAPTION_TEST_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome", "google-chrome-stable"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


# -- the warehouse ------------------------------------------------------------------------
def write_warehouse(path: Path) -> list[dict[str, Any]]:
    """pipeline_runs rows with known values, through the project's own warehouse code."""
    from caption_platform.warehouse import DuckDBWarehouse, tables

    declared = tables.columns(tables.PIPELINE_RUNS)
    start = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)
    rows: list[dict[str, Any]] = []

    def add(**row: Any) -> None:
        optional = {"run_kind": row.pop("run_kind", None),
                    "benchmark_id": row.pop("benchmark_id", None),
                    "files_skipped": sum(row.get("skips", {}).values()),
                    "skipped_by_reason": json.dumps(row.pop("skips", {})), "num_beams": 5,
                    "max_new_tokens": 30, "decoding": "beam",
                    "blip_model": "Salesforce/blip-image-captioning-base",
                    "clip_model": "openai/clip-vit-base-patch32"}
        row.update({k: v for k, v in optional.items() if k in declared})
        rows.append(row)

    n = 0
    for version, runs in BENCHMARK.items():
        for runtime, ips, cost in runs:
            n += 1
            started = start + timedelta(days=n)
            add(run_id=f"bench_{n:02d}", dag_id="benchmark_beam_sdks", beam_sdk_version=version,
                runner="DataflowRunner", machine_type="n1-standard-4", gpu_type="nvidia-tesla-t4",
                started_at=started, finished_at=started + timedelta(seconds=runtime),
                runtime_s=runtime, images_in=100, images_captioned=100, images_failed=0,
                images_per_s=ips, cost_per_1k_images_usd=cost, num_captions=5,
                final_state="JOB_STATE_DONE", run_kind="benchmark",
                benchmark_id="benchmark_beam_sdks__2026-11-01",
                skips={"not_image": 2, "duplicates": 1, "capped": 0})
    # two local runs of the captioning DAG, between the latest benchmark runs (the newest
    # five: bench_09, local_1, bench_08, local_0, bench_07): the filters tell them apart
    for i in range(2):
        started = start + timedelta(days=7 + i, hours=12)
        add(run_id=f"local_{i}", dag_id="caption_images", beam_sdk_version="2.77.0",
            runner="DirectRunner", machine_type="local", gpu_type=None, started_at=started,
            finished_at=started + timedelta(seconds=60), runtime_s=60.0 + i, images_in=6,
            images_captioned=5, images_failed=1, images_per_s=0.08, num_captions=3,
            cost_per_1k_images_usd=0.2, final_state="JOB_STATE_DONE", run_kind="manual",
            skips={"not_image": 10, "too_large": 1})
    warehouse = DuckDBWarehouse(path)
    warehouse.ensure_tables()
    for row in rows:
        warehouse.record_run(row)
    return rows


# -- processes ------------------------------------------------------------------------------
def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process group ``proc`` leads, then SIGKILL; bounded."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # leftovers of the group
            os.killpg(proc.pid, signal.SIGKILL)
        return


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class ApiServer:
    """Airflow's api-server on a free loopback port; plain HTTP, redirects not followed."""

    def __init__(self, port: int, proc: subprocess.Popen, log: Path, password: str) -> None:
        self.port, self.proc, self.log, self.password = port, proc, log, password
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: Any = None, token: str | None = None) -> Response:
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()

    def token(self, username: str = "admin", password: str | None = None) -> str:
        resp = self.request("POST", "/auth/token", body={
            "username": username, "password": password or self.password})
        assert resp.status in (200, 201), (resp.status, resp.text)
        return resp.json()["access_token"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("performance_page")
    rows = write_warehouse(root / "warehouse.duckdb")
    assert len(rows) == 11
    home, dags = root / "airflow_home", root / "dags"
    home.mkdir()
    dags.mkdir()
    (dags / "deployment_dags.py").write_text(DAGS_FILE)
    (root / "some_dags_hidden.py").write_text(AUTH_MANAGER_MODULE)
    password = secrets.token_urlsafe(12)
    passwords = root / "passwords.json"
    outsider_password = secrets.token_urlsafe(12)
    passwords.write_text(json.dumps({"admin": password, OUTSIDER: outsider_password}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW__", "CAPTION_")) and k != "AIRFLOW_HOME"}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__AUTH_MANAGER": "some_dags_hidden.SomeDagsHiddenAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"admin:admin,{OUTSIDER}:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "CAPTION_PROFILE": "local",
        "CAPTION_DUCKDB_PATH": str(root / "warehouse.duckdb"),
        "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(PLUGINS), str(root), env.get("PYTHONPATH")) if p),
    })
    migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True,
                             text=True, timeout=180)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-3000:]
    # the DAGs, known to Airflow (as the dag-processor would make them)
    parsed = subprocess.run([AIRFLOW, "dags", "reserialize"], env=env, capture_output=True,
                            text=True, timeout=180)
    assert parsed.returncode == 0, parsed.stdout[-2000:] + parsed.stderr[-3000:]
    port = free_port()
    log = root / "api-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    api = ApiServer(port, proc, log, password)
    api.passwords = {"admin": password, OUTSIDER: outsider_password}
    try:
        def healthy() -> bool:
            assert proc.poll() is None, f"api-server exited with {proc.returncode}"
            return api.request("GET", "/api/v2/monitor/health").status == 200

        wait_until(healthy, 90, "api-server /api/v2/monitor/health",
                   on_timeout=lambda: tail(log))
        yield api
    finally:
        stop_group(proc)
        print(f"\napi-server log: {log}")


# -- the page's logic, without a server ------------------------------------------------------
def test_page_logic_without_a_server() -> None:
    import caption_performance as plugin

    from caption_platform.benchmark import page_app as page

    # the plugin file loads outside Airflow and mounts the page's lazily built app
    assert isinstance(plugin.app, page.LazyASGIApp)
    assert plugin.CaptioningPerformancePlugin.fastapi_apps == [
        {"app": plugin.app, "url_prefix": page.URL_PREFIX, "name": page.VIEW_NAME}]
    assert page.parse_query([("runner", " DirectRunner "), ("limit", ""), ("threshold", "5")]) \
        == ({"runner": "DirectRunner"}, {"threshold": "5"})
    for bad in ([("runner", "a"), ("runner", "b")], [("x", "1")], [("dag_id", "a\nb")],
                [("dag_id", "x" * 201)]):
        with pytest.raises(page.BadRequest):
            page.parse_query(bad)
    for bad_limit in ("0", "-1", "1e3", str(page.MAX_LIMIT + 1)):
        with pytest.raises(page.BadRequest):
            page.parse_limit(bad_limit)
    for bad_threshold in ("nan", "inf", "-1", "abc"):
        with pytest.raises(page.BadRequest):
            page.parse_threshold(bad_threshold)
    rows = [{"dag_id": "a", "num_captions": 5, "runner": "R", "beam_sdk_version": "2.77.0",
             "runtime_s": 1.0},
            {"dag_id": "b", "num_captions": 3.0, "runner": None, "beam_sdk_version": "2.77.0",
             "runtime_s": 2.0}]
    assert page.available_filters(rows) == ["dag_id", "runner", "num_captions"]
    assert page.filter_rows(rows, {"num_captions": "3"}) == [rows[1]]  # 3.0 reads as "3"
    assert page.choices(rows + [{"num_captions": 10}], "num_captions") == ["3", "5", "10"]
    empty = page.render_page([], [], action="/captioning/", source="DuckDB table t")
    assert 'id="no-runs"' in empty and "No pipeline runs are recorded yet" in empty
    none = page.render_page(rows, [("dag_id", "c")], action="/captioning/", source="t")
    assert "No runs match these filters" in none and "<img" not in none
    full = page.render_page(rows, [("run_kind", "benchmark")], action="/captioning/",
                            source="t")
    assert full.index('id="filters"') < full.index("<h1>") and '<table id="metrics">' in full
    assert "Not applied" in full and "run_kind=benchmark" in full
    assert "left out" not in full and "may not read" not in full
    # a stored value that is mathtext to matplotlib is drawn as it is (Hardening item 4)
    odd = [{**r, "beam_sdk_version": v} for r, v in zip(rows, ("$\\foo{$", "$x^2$"),
                                                         strict=True)]
    drawn = page.render_page(odd, [], action="/captioning/", source="t")
    assert '<table id="metrics">' in drawn and "$\\foo{$" in drawn and "$x^2$" in drawn
    with pytest.raises(page.BadRequest):
        page.parse_limit("\u00b2")  # str.isdigit() takes it, int() does not
    # "Skipped files, by reason": the shown runs' skipped_by_reason summed, zeros left out;
    # no section for rows of an older release (no such column), a bad value is not counted
    skips = [{**rows[0], "skipped_by_reason": '{"not_image": 3, "capped": 0}'},
             {**rows[1], "skipped_by_reason": {"not_image": 1, "duplicates": 5}},
             {**rows[1], "skipped_by_reason": "not json"}]
    with_skips = page.render_page(skips, [], action="/captioning/", source="t")
    assert ('<table id="skipped"><thead><tr><th class="l">reason</th><th>files</th></tr>'
            '</thead><tbody><tr><td class="l">duplicates</td><td>5</td></tr>'
            '<tr><td class="l">not_image</td><td>4</td></tr></tbody></table>') in with_skips
    assert "of the 2 run(s) shown" in with_skips
    assert 'id="skipped"' not in full
    none_skipped = page.render_page([{**rows[0], "skipped_by_reason": '{"capped": 0}'}], [],
                                    action="/captioning/", source="t")
    assert 'id="skipped-none"' in none_skipped


def test_readable_dag_ids_ask_the_auth_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page reads the runs of the DAGs the auth manager lets the user read (and whose
    runs it may read), asked before any row is read (Hardening item 5)."""
    import airflow.api_fastapi.app as airflow_app

    from caption_platform.benchmark import page_app as page

    asked: list[tuple] = []

    class Manager:
        def get_authorized_dag_ids(self, *, user, method="GET"):
            asked.append(("dags", user, method))
            return {"caption_images", "benchmark_beam_sdks", "no_runs_for_you"}

        def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
            asked.append(("dag", details.id, method, access_entity))
            return details.id != "no_runs_for_you"

    monkeypatch.setattr(airflow_app, "get_auth_manager", lambda: Manager())
    assert page.readable_dag_ids("someone") == {"caption_images", "benchmark_beam_sdks"}
    assert asked[0] == ("dags", "someone", "GET")
    assert {(a[2], str(a[3])) for a in asked[1:]} == {("GET", "DagAccessEntity.RUN")}


# -- the page in Airflow's api-server -----------------------------------------------------------
@pytest.mark.slow
def test_page_is_refused_without_a_login(server: ApiServer) -> None:
    # an API client: 401, as Airflow's own API answers
    resp = server.request("GET", PAGE, headers={"Accept": "application/json"})
    assert resp.status == 401, (resp.status, resp.text)
    assert "captioning" not in resp.text.lower() and "<table" not in resp.text
    # a browser: sent to Airflow's login page, which comes back here afterwards
    resp = server.request("GET", PAGE + "?runner=DirectRunner",
                          headers={"Accept": "text/html,application/xhtml+xml"})
    assert resp.status == 303, (resp.status, resp.text)
    location = resp.headers["location"]
    assert location.startswith("/auth/login?next="), location
    assert "captioning" in location and "DirectRunner" in location
    assert "<table" not in resp.text
    # a forged or stale token: refused by the auth manager's validation
    for bad in ("not-a-jwt", server.token()[:-4] + "AAAA"):
        resp = server.request("GET", PAGE, token=bad)
        assert resp.status in (401, 403), (resp.status, resp.text)
        assert "<table" not in resp.text
        resp = server.request("GET", PAGE, headers={"Cookie": f"_token={bad}"})
        assert resp.status in (401, 403), (resp.status, resp.text)


@pytest.mark.slow
def test_plugin_is_registered_with_its_navigation_entry(server: ApiServer) -> None:
    token = server.token()
    resp = server.request("GET", "/api/v2/plugins", token=token)
    assert resp.status == 200, resp.text
    (plugin,) = [p for p in resp.json()["plugins"] if p["name"] == "caption_performance"]
    (view,) = plugin["external_views"]
    assert view["name"] == "Captioning performance"
    assert view["url_route"] == "captioning-performance" and view["destination"] == "nav"
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/captioning"]
    errors = server.request("GET", "/api/v2/plugins/importErrors", token=token).json()
    assert errors["total_entries"] == 0, errors


@pytest.mark.slow
def test_logged_in_user_sees_the_report(server: ApiServer) -> None:
    import re

    token = server.token()
    resp = server.request("GET", PAGE, token=token)  # the Authorization header
    assert resp.status == 200, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert page.count('src="data:image/png;base64,') >= 6  # 3 metrics x (by version, by date)
    assert '<table id="versions">' in page and '<table id="metrics">' in page
    metrics = page[page.index('<table id="metrics">'):]
    metrics = metrics[: metrics.index("</table>")]
    for version in BENCHMARK:
        assert f"<td class=\"l\">{version}" in metrics
    # runtime medians: 110, 100 and, over the 2.77.0 benchmark and local runs, 130..150 + 60, 61
    assert "<td>110.0</td>" in metrics and "<td>100.0</td>" in metrics
    assert "REGRESSION" in metrics
    assert '<form method="get" action="/captioning/">' in page
    assert "11 of the latest 11 run(s)" in page
    mixed = page[page.index("mix several values of: "):]
    mixed = mixed[: mixed.index("</p>")]
    for label in ("DAG", "Runner", "Machine type", "GPU type", "Captions per image"):
        assert label in mixed, mixed
    for name in ("dag_id", "runner", "machine_type", "gpu_type", "num_captions"):
        assert f'name="{name}"' in page
    # the files the runs' manifests skipped, summed per reason over the 11 runs shown
    skipped = page[page.index('<table id="skipped">'):]
    skipped = skipped[: skipped.index("</table>")]
    cells = re.findall(r'<td class="l">([a-z_]+)</td><td>(\d+)</td>', skipped)
    assert cells == [("not_image", "38"), ("duplicates", "9"), ("too_large", "2")]
    assert "Skipped files, by reason" in page and "of the 11 run(s) shown" in page
    # the UI's cookie works the same way as the header
    by_cookie = server.request("GET", PAGE, headers={"Cookie": f"_token={token}"})
    assert by_cookie.status == 200 and '<table id="metrics">' in by_cookie.text


@pytest.mark.slow
def test_filters_narrow_the_runs_and_bad_values_are_refused(server: ApiServer) -> None:
    from caption_platform.warehouse import tables

    token = server.token()
    query = urlencode({"dag_id": "benchmark_beam_sdks", "gpu_type": "nvidia-tesla-t4",
                       "baseline": "2.76.0", "threshold": "5"})
    page = server.request("GET", f"{PAGE}?{query}", token=token).text
    assert "9 of the latest 11 run(s)" in page
    assert "<td>140.0</td>" in page  # 2.77.0 median without the local runs
    assert '<option value="2.76.0" selected>' in page and "mix several" not in page
    page = server.request("GET", PAGE + "?runner=DirectRunner", token=token).text
    assert "2 of the latest 11 run(s)" in page and "2.75.0" not in page
    assert "<td>60.50</td>" in page  # median runtime of the two local runs
    page = server.request("GET", PAGE + "?runner=SparkRunner", token=token).text
    assert 'id="no-runs"' in page and "No runs match these filters" in page
    assert "<img" not in page
    if "run_kind" in tables.columns(tables.PIPELINE_RUNS):
        page = server.request("GET", PAGE + "?run_kind=manual", token=token).text
        assert "2 of the latest 11 run(s)" in page
    else:  # not a column yet: not offered, and a link that uses it says so
        page = server.request("GET", PAGE + "?run_kind=manual", token=token).text
        assert 'name="run_kind"' not in page and "Not applied" in page
    for bad in ("?runner=" + "x" * 201, "?runner=a&runner=b", "?dag_id=%00",
                "?limit=0", "?threshold=abc", "?nope=1"):
        resp = server.request("GET", PAGE + bad, token=token)
        assert resp.status == 400, (bad, resp.status)
        assert 'id="bad-request"' in resp.text
    # filter values are data, never SQL or markup
    resp = server.request("GET", PAGE + "?dag_id=" + "x'%3B%20DROP%20TABLE%20pipeline_runs%3B--",
                          token=token)
    assert resp.status == 200 and "No runs match" in resp.text
    resp = server.request("GET", PAGE + "?dag_id=%3Cscript%3Ealert(1)%3C/script%3E",
                          token=token)
    assert resp.status == 200 and "<script>" not in resp.text
    assert "11 of the latest 11" in server.request("GET", PAGE, token=token).text


@pytest.mark.slow
def test_the_page_reveals_nothing_of_runs_the_user_may_not_read(server: ApiServer) -> None:
    """Hardening item 5: with a DAG the user may not read, `?limit=3` showed no note,
    `?limit=4` said one run was left out, `?limit=5` two: where another team's runs are in
    the timeline. Now only the readable DAGs' runs are read, the limit counting them alone,
    and nothing on the page changes with the hidden runs."""
    import re

    admin = server.token()
    # the two DAGs' runs are interleaved: the newest five alternate between them
    page = server.request("GET", PAGE + "?limit=5", token=admin).text
    assert "5 of the latest 5 run(s)" in page and HIDDEN_DAG in page
    token = server.token(OUTSIDER, server.passwords[OUTSIDER])
    pages = {}
    for limit in range(1, 13):
        resp = server.request("GET", f"{PAGE}?limit={limit}", token=token)
        assert resp.status == 200, (limit, resp.status, resp.text[-2000:])
        text = resp.text
        n = min(limit, 9)  # the outsider's runs: the nine benchmark runs
        assert f"{n} of the latest {n} run(s)" in text, (limit, text[-3000:])
        for trace in (HIDDEN_DAG, "DirectRunner", "local_", "left out", "may not read",
                      'class="cp-note"'):
            assert trace not in text, (limit, trace)
        for varies in (r"Generated [^;]*;", r'name="limit"[^>]*>', r"read at most \d+\)"):
            text = re.sub(varies, "", text)
        pages[limit] = text
    # past the readable runs, a larger limit changes nothing at all
    assert pages[9] == pages[10] == pages[12]
    # the skipped-file totals are the readable runs' alone (9 x 2 and 9 x 1)
    assert '<td class="l">not_image</td><td>18</td>' in pages[9]
    assert "too_large" not in pages[12]
    assert '<table id="metrics">' in pages[9] and "REGRESSION" in pages[9]


# -- the browser ---------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven through the DevTools protocol on a pipe (fds 3 and 4)."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,900")

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        import fcntl

        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # High, close-on-exec copies, so that the child's dup2 to 3 and 4 cannot clobber them.
        high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def pipe_fds() -> None:  # in the child: the protocol's fd 3 (reads) and fd 4 (writes)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [binary, *self.FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                close_fds=False, preexec_fn=pipe_fds, start_new_session=True)
        os.close(high_r)
        os.close(high_w)
        self.log = log
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        stop_group(self.proc, grace=5)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message from Chromium\n{tail(self.log)}")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe\n{tail(self.log)}")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["method"] == method and event.get("sessionId") == session:
                    return self.events.pop(i)
            message = self._receive(deadline)
            if "method" in message:
                self.events.append(message)

    def navigate(self, session: str, url: str, timeout: float = 30) -> None:
        self.events.clear()
        result = self.call("Page.navigate", {"url": url}, session)
        assert not result.get("errorText"), (url, result)
        self.wait_event("Page.loadEventFired", session, timeout)

    def evaluate(self, session: str, expression: str, context: int | None = None) -> Any:
        params: dict[str, Any] = {"expression": expression, "returnByValue": True}
        if context is not None:
            params["contextId"] = context
        result = self.call("Runtime.evaluate", params, session)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def screenshot(self, session: str, path: Path, *, full_page: bool) -> Path:
        import base64

        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.call("Page.captureScreenshot", params, session)["data"]
        path.write_bytes(base64.b64decode(data))
        if keep := os.environ.get("CAPTION_TEST_ARTIFACTS"):  # CI: a folder it collects
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(keep) / path.name)
        return path


#: What the page shows, read in the browser: decoded charts, the tables, the filter form.
PAGE_STATE = """(() => {
  const charts = [...document.querySelectorAll('img')]
      .filter(i => i.src.startsWith('data:image/png'));
  const table = id => { const t = document.getElementById(id); return t ? t.innerText : null; };
  return {title: document.title, charts: charts.length,
          decoded: charts.filter(i => i.complete && i.naturalWidth > 300).length,
          versions: table('versions'), metrics: table('metrics'),
          filters: [...document.querySelectorAll('#filters select')].map(s => s.name),
          shown: (document.getElementById('shown') || {}).innerText || null};
})()"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium: install Debian's browser (`apt-get install -y chromium`, as "
                    ".ci/run does) or set CAPTION_TEST_CHROMIUM=/path/to/chrome")
    chromium = Chromium(binary, tmp_path / "chromium-profile", tmp_path / "chromium.log")
    try:
        chromium.call("Browser.getVersion", timeout=30)
        yield chromium
    finally:
        chromium.close()


def open_tab(browser: Chromium) -> str:
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget",
                           {"targetId": target, "flatten": True})["sessionId"]
    browser.call("Page.enable", session=session)
    browser.call("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
    return session


def log_in(browser: Chromium, session: str, server: ApiServer) -> None:
    """Fill in Airflow's own login page (SimpleAuthManager) and sign in, as a person does."""
    wait_until(lambda: browser.evaluate(session, "!!document.querySelector('input[name=password]')"),
               30, "Airflow's login form")
    for name, text in (("username", "admin"), ("password", server.password)):
        browser.evaluate(session, f"document.querySelector('input[name={name}]').focus(); true")
        browser.call("Input.insertText", {"text": text}, session)
    wait_until(lambda: browser.evaluate(session, (
        "(() => { const b = document.querySelector('button[type=submit]');"
        " if (!b || b.disabled) return false; b.click(); return true; })()")),
        10, "an enabled Sign in button")


@pytest.mark.slow
def test_page_in_headless_chromium(
    browser: Chromium, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server: ApiServer = request.getfixturevalue("server")  # only once a browser is there
    session = open_tab(browser)

    # 1. not logged in: the page sends the browser to Airflow's login page, which sets the
    #    UI's `_token` cookie and comes back to the page
    browser.navigate(session, server.base + PAGE)
    assert browser.evaluate(session, "location.pathname") == "/auth/login"
    assert browser.evaluate(session, "document.getElementById('metrics')") is None
    log_in(browser, session, server)

    def report_shown() -> Any:
        here = browser.evaluate(session, "[location.pathname, document.readyState]")
        if here != [PAGE, "complete"]:
            return None
        state = browser.evaluate(session, PAGE_STATE)
        return state if state["metrics"] else None

    state = wait_until(report_shown, 30, "the page after logging in",
                       on_timeout=lambda: str(browser.evaluate(session, "location.href")))
    assert state["title"].startswith("Captioning performance"), state
    assert state["charts"] >= 6 and state["decoded"] == state["charts"], state
    assert all(v in state["metrics"] for v in BENCHMARK), state
    assert "REGRESSION" in state["metrics"] and "110.0" in state["metrics"], state
    assert state["versions"] and "dag_id" in state["filters"], state
    shot = browser.screenshot(session, tmp_path / "performance_page.png", full_page=True)
    print(f"\nscreenshot (page): {shot}")
    assert shot.stat().st_size > 50_000

    # 2. the filter form, submitted like a person would
    browser.events.clear()
    browser.evaluate(session, "document.getElementById('filter-runner').value = "
                              "'DataflowRunner'; document.querySelector('#filters form')"
                              ".submit(); true")
    browser.wait_event("Page.loadEventFired", session, 30)
    state = browser.evaluate(session, PAGE_STATE)
    assert "9 of the latest 11" in state["shown"], state
    assert "runner=DataflowRunner" in browser.evaluate(session, "location.search")

    # 3. inside Airflow's UI: the navigation entry's route shows the page in a frame
    browser.navigate(session, server.base + "/plugin/captioning-performance")

    def framed(expect: str) -> Callable[[], Any]:
        def check() -> Any:
            tree = browser.call("Page.getFrameTree", session=session)["frameTree"]
            for child in tree.get("childFrames", []):
                frame = child["frame"]
                if frame["url"].startswith(server.base + PAGE):
                    world = browser.call("Page.createIsolatedWorld", {
                        "frameId": frame["id"], "worldName": "check"}, session)
                    context = world["executionContextId"]
                    inner = browser.evaluate(session, PAGE_STATE, context)
                    if (inner and inner["metrics"] and expect in (inner["shown"] or "")
                            and inner["decoded"] == inner["charts"] > 0):
                        return {**inner, "context": context}
            return None
        return check

    def frame_tree() -> str:
        return json.dumps(browser.call("Page.getFrameTree", session=session))

    inner = wait_until(framed("11 of the latest 11"), 45, "the page framed in Airflow's UI",
                       on_timeout=frame_tree)
    assert all(v in inner["metrics"] for v in BENCHMARK), inner
    shot = browser.screenshot(session, tmp_path / "performance_page_in_airflow_ui.png",
                              full_page=False)
    print(f"screenshot (in Airflow's UI): {shot}")
    # the filter form works inside the UI's frame too (the frame's request carries the login)
    browser.evaluate(session, "document.getElementById('filter-dag_id').value = "
                              "'caption_images'; document.querySelector('#filters form')"
                              ".submit(); true", inner["context"])
    wait_until(framed("2 of the latest 11"), 30, "the filtered page in the UI's frame",
               on_timeout=frame_tree)

    # 4. the entry in the UI's Browse menu
    browser.evaluate(session, "[...document.querySelectorAll('button')]"
                              ".find(b => b.innerText.trim() === 'Browse').click(); true")
    entry = wait_until(lambda: [a for a in browser.evaluate(session, (
        "[...document.querySelectorAll('a')].map(a => [a.innerText.trim(), "
        "a.getAttribute('href')])")) if a[0] == "Captioning performance"],
        10, "the Browse menu's entry")
    assert entry[0][1].endswith("plugin/captioning-performance"), entry
