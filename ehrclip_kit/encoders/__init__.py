"""Modality encoders (tabular, text, codes, ECG) and projection heads."""
