"""Free the concurrency slots of runs killed on this host, so a rerun's GPU stage does not queue behind them.

A stage task tagged ``gpu`` holds a slot of the ``gpu`` tag limit (``comat deploy --local``) while it
runs. Prefect 3 holds such a slot through a lease the task engine renews; it is fixed at 60 s
(``lease_duration=60`` in ``prefect/task_engine.py``, no setting), and the server's repossessor,
which looks every ``PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS`` (15 s), frees it once it has
expired. A run killed with ``kill -9`` renews nothing, so its slot stays taken for 60 to 75 s after the
kill, and with a limit of 1 a rerun's GPU stage waited that long, although comat's own stage lease of the
dead run is taken over at once (``comat_core/store/lease.py``).

So each flow run that starts a stage marks itself with labels naming its process (``comat.host``,
``comat.pid``, ``comat.process-started``: the same host id and process start time as a stage lease),
and before a GPU stage is submitted, ``free_dead_slots`` looks at the holders of the ``gpu`` limit: a
task run whose flow run is marked with this host and a process that is gone has its slot released
(``/concurrency_limits/decrement`` for that task run, which revokes its lease) and is set ``Crashed``.
Holders on other hosts, or without the labels, are left to Prefect's lease expiry.
"""

from __future__ import annotations

import logging
import os

from comat_core.store.lease import host_id, pid_alive, process_started

log = logging.getLogger("comat.slots")

HOST, PID, STARTED = "comat.host", "comat.pid", "comat.process-started"


def mark_this_process(client, flow_run_id) -> None:
    """Label the flow run with this host and process (what ``free_dead_slots`` checks)."""
    pid = os.getpid()
    client.update_flow_run_labels(flow_run_id, {HOST: host_id(), PID: str(pid), STARTED: process_started(pid)})


def gone(labels: dict) -> bool:
    """The labels name a process on this host that no longer runs (or whose pid now belongs to another)."""
    if labels.get(HOST) != host_id() or not str(labels.get(PID, "")).isdigit():
        return False
    return not pid_alive(int(labels[PID]), str(labels.get(STARTED) or ""))


def free_dead_slots(tag: str) -> list[str]:
    """Mark this flow run, then release every slot of the ``tag`` limit held by a task run of a dead process on
    this host; the freed task runs' ids. Best effort: any trouble leaves the slots to Prefect's expiry."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    freed = []
    try:
        with get_client(sync_client=True) as client:
            if flow_run.id:
                mark_this_process(client, flow_run.id)
            try:
                holders = client.read_concurrency_limit_by_tag(tag).active_slots
            except ObjectNotFound:
                return []
            for task_run_id in holders:
                task_run = client.read_task_run(task_run_id)
                if task_run.flow_run_id is None or task_run.flow_run_id == flow_run.id:
                    continue
                labels = client.read_flow_run(task_run.flow_run_id).labels or {}
                if not gone(labels):
                    continue
                client.decrement_v1_concurrency_slots(names=[tag], task_run_id=task_run_id, occupancy_seconds=0)
                client.set_task_run_state(task_run_id, Crashed(message=f"process {labels[PID]} is gone (killed)"),
                                          force=True)
                freed.append(str(task_run_id))
                log.info("freed the %s slot of task run %r: held by pid %s on this host, a process that is gone",
                         tag, task_run.name, labels[PID])
    except Exception as e:  # noqa: BLE001 - never fail a stage over this; Prefect frees the slot later
        log.warning("could not check the %s slots for runs that are gone: %s: %s", tag, type(e).__name__, e)
    return freed
