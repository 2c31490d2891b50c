"""Compute accounting: the run ledger, regulatory thresholds and the run report."""
