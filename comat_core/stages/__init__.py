"""The pipeline stages: the registry (keys, caching, ``run_stage``) and one module or package per stage."""
