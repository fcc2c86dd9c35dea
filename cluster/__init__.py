"""Cluster (top floor): the `bgsplit` CLI and the drivers of many jobs: Ray Train, Ray tasks, the experiment (Tune)."""
