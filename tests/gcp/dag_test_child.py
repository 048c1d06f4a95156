"""Run one DAG through Airflow's own ``dag.test()`` in a process of its own, and print each
task instance's state and the run's state as one JSON line.

    python dag_test_child.py DAGS_FOLDER DAG_ID LOGICAL_DATE 'CONF_JSON'

For tests whose Google clients must start from a clean process: the Dataflow API fake is
reached through ``https_proxy`` and a CA of its own, which httplib2 and gRPC read once per
process (tools/fake_dataflow.py). Retries wait 1 s, not the DAG's minutes.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta


def main() -> None:
    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    folder, dag_id, logical, conf = sys.argv[1:5]
    bag = DagBag(folder)
    if bag.import_errors:
        raise SystemExit(f"import errors: {bag.import_errors}")
    dag = bag.dags[dag_id]
    for task in dag.tasks:
        task.retry_delay = timedelta(seconds=1)
    when = pendulum.parse(logical)
    dr = dag.test(run_conf=json.loads(conf), logical_date=when, run_after=when)
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    print("DAG_TEST_RESULT " + json.dumps({"run_id": dr.run_id, "state": str(dr.state),
                                           "tasks": states}), flush=True)


if __name__ == "__main__":
    main()
