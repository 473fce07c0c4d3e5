"""Evaluation: task metrics, few-shot prompting, win rates, probes."""
