"""Multi-Rollout On-Policy Distillation (MOPD) in JAX."""
