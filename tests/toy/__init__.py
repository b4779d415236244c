"""Tests of toy."""
