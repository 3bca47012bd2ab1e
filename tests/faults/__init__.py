"""Fault and bad-input suite (issue 8): crashes, restarts and hostile input."""
