"""Held-out evaluation, statistics (bootstrap intervals) and seeded comparisons."""
