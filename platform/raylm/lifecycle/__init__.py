"""New models into a live endpoint: the promotion history, the eval gate, rollouts and rollback,
adapters. Above serve/ (which deploys an app) and evaluate.py (which scores a checkpoint)."""
