"""Helpers for the small-scale reproduction experiments (issue 8): corpus assembly and friends."""
