"""Prefect flows (the parent ``comat`` flow and one flow per stage), deployments and the ``comat`` CLI."""
