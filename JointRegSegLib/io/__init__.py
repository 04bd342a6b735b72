"""Input and output: reading and validating volumes, input plausibility checks, atomic writing of a run's
outputs, the human-readable report. Depends on `core` only."""
