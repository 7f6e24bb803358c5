"""The artifact store: fsspec storage with stage keys and manifests, committed shards, training checkpoints."""
