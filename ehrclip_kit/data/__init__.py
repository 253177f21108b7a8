"""Data: the synthetic world, MIMIC-IV recipes, notes, code sequences, ECGs, splits and torch datasets."""
