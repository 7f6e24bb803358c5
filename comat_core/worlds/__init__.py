"""Controlled worlds in which the method's effect can be measured end to end (the shapes world)."""
