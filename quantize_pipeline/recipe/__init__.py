"""The recipe language: the pydantic schema, schemes, layer patterns, checks, plan, and what a recipe resolves to on this machine (model folder, devices, compute dtype)."""
