"""posttrain: GSPO RL and multi-teacher on-policy distillation on Ray + vLLM."""
__version__ = "0.1.0"
