"""Shared plumbing: errors, hashing and run records used by every stage."""
