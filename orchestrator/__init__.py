"""Orchestrator: recipes, pipelines, the artifact store and the executors; never imports torch."""
