"""Metrics (incl. from site aggregates), plots and reports."""
