"""Datasets: built-in example tasks, loading and formatting."""
