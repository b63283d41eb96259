"""Tests for the SMS channel."""
