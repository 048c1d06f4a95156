"""Airflow plugin: the "Captioning performance" page in the Airflow UI.

Mounts the page's app (:mod:`caption_platform.benchmark.page_app`, which describes the
page, its authentication and its filters) under ``/captioning/`` of Airflow's API server
and adds the entry "Captioning performance" to the UI's Browse menu.

Every Airflow process imports this file while it looks for plugins, so it imports nothing
heavy: the app is built on the first request (:class:`~.page_app.LazyASGIApp`).
"""

try:
    from airflow.plugins_manager import AirflowPlugin
except ImportError:  # a worker with the Task SDK only: Airflow matches plugin classes by name
    from airflow.sdk.plugins_manager import AirflowPlugin  # type: ignore[no-redef]

from caption_platform.benchmark.page_app import (
    URL_PREFIX,
    URL_ROUTE,
    VIEW_NAME,
    LazyASGIApp,
    build_app,
)

app = LazyASGIApp(build_app)


class CaptioningPerformancePlugin(AirflowPlugin):
    """The "Captioning performance" page: its app and its entry in the UI's Browse menu."""

    name = "caption_performance"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": VIEW_NAME}]
    external_views = [
        {
            "name": VIEW_NAME,
            # Relative: resolved against the UI's <base href>, so a base_url with a path
            # (Airflow behind a proxy at /airflow/) still reaches the app.
            "href": f"{URL_PREFIX.lstrip('/')}/",
            "url_route": URL_ROUTE,
            "destination": "nav",
            "category": "browse",
        }
    ]
