"""Tests of vision-language support."""
