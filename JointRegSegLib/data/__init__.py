"""Offline few-shot training data: real templates from registry packages plus synthetic subjects."""
