"""Tests of teachers."""
