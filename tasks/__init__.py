"""Thin Prefect tasks around ``comat_core.stages.registry.run_stage``, and the Prefect reporting they use.

* ``stage``: one task per stage (``STAGE_TASKS``, ``run_stage_task``); ``results``: where their results persist;
* ``artifacts``, ``events``, ``logs``: what a stage run shows in the UI (artifacts, events, run logs);
* ``summary``, ``rows``: a pipeline run's summary rows and closing lines;
* ``logs`` also sets up the ``comat`` command's console and debug log.

Importing this package imports no module of it: a fully cached ``comat run`` reads ``summary`` and
``logs`` without importing Prefect (``summary``, ``rows`` and ``logs`` import it only where they use it).
"""
