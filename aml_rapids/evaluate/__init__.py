"""Evaluate stage: metrics with bootstrap intervals, patient-level aggregation, plots."""
