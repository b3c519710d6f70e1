"""`triarch profile`: where each step's time goes, per rank (docs/profiling.md)."""
