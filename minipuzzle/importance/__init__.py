"""Importance scoring: a score for every layer and every prunable unit of a Nemotron-H checkpoint."""
