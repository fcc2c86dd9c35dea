"""Cluster launch (Ray)."""
