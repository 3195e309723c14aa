"""Orchestration of a run: the plan of stages, the up-front checks, the runner, and --resume's search."""
