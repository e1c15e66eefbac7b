"""Synthetic data for psp-fl: phantom cohorts on the MNI152 template (``psp-sim cohort``).

Nothing under ``psp_model`` imports this package; it writes files that the pipeline reads like real data.
"""
