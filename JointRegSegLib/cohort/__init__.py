"""Cohorts: `jointregseg batch` (a CSV of pairs) and its worker processes. Depends on the engine below and
on `cli`'s run helpers, never on `slicer`."""
