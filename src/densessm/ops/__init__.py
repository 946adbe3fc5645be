"""Kernels: each op has a readable reference (``naive``) that the fast forms are tested against."""
