"""Rewards that misbehave on purpose (used by tests/loops/test_gspo_run.py)."""
import time


def always_raises(data_source, solution_str, ground_truth, extra_info=None):
    raise ValueError("this reward is broken")


def hangs_on_even_rows(data_source, solution_str, ground_truth, extra_info=None):
    if extra_info["index"] % 2 == 0:
        time.sleep(3600)  # never returns: the run must cancel it at rewards.timeout_s
    return 1.0
