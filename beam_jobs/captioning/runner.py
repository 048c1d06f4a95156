"""Pick the runner: local runs use Beam's in-process Python runner, never Prism.

In Beam 2.77 ``DirectRunner`` is ``SwitchingDirectRunner``, which first tries the Prism
runner; Prism downloads a Go binary from GitHub on first use (a network call, and a wait,
on an offline laptop or CI box). Its fallback after Prism is the in-process ``FnApiRunner``,
so for ``--runner DirectRunner`` (or none) we construct that runner ourselves, the same way
SwitchingDirectRunner does, and skip Prism altogether. Any other runner is left to Beam.
"""

from __future__ import annotations

from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from captioning.layout import EXIT_WITH_PARENT_ENV

LOCAL_RUNNER_NAMES = {"", "direct", "directrunner", "switchingdirectrunner"}


def runner_name(options: PipelineOptions) -> str:
    """The runner as the user named it; DirectRunner when unset (Beam's default)."""
    name = options.view_as(StandardOptions).runner
    if name is None:
        return "DirectRunner"
    return name if isinstance(name, str) else type(name).__name__


def is_local(options: PipelineOptions) -> bool:
    return runner_name(options).lower() in LOCAL_RUNNER_NAMES


def make_runner(options: PipelineOptions) -> Any:
    """An in-process FnApiRunner for local runs; None to let Beam pick the named runner."""
    if not is_local(options):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision_info = fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=provision_info)


def exit_with_parent(poll_s: float = 1.0) -> bool:
    """When :data:`EXIT_WITH_PARENT_ENV` is set, end this process as soon as its parent
    (the Airflow task that launched it) is gone, so a task killed with SIGKILL, which no
    handler can forward, never leaves a local Beam job running and writing on its own.

    A daemon thread watches the parent id (re-parented to init or a subreaper once the
    parent dies). Returns whether the watch started.
    """
    import os
    import threading
    import time

    if os.environ.get(EXIT_WITH_PARENT_ENV) != "1":
        return False
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"caption job: parent process {parent} is gone; stopping", flush=True)
        os._exit(137)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return True
