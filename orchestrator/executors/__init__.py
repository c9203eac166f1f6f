"""Executors: turn a plan into launched processes (local) or jobs (cluster)."""
