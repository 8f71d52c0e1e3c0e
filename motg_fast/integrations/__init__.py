"""Integrations of motg_fast with other training libraries (each one an optional extra).

- `motg_fast.integrations.trl`: `MixtureGRPOTrainer`, MoT-G inside TRL's `GRPOTrainer`
  (`pip install "motg-fast[trl]"`). See docs/integrations.md.

Nothing is imported here, so `import motg_fast` never needs an optional dependency.
"""
