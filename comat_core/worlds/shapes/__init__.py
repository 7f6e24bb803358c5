"""The shapes world: renderer, judge, vocabulary and splits, captioner and base model builders (no Prefect)."""
