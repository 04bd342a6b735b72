"""Foundations every other package uses: errors, physical-space geometry, intensity normalisation, device and
thread choice, progress reporting. Imports nothing else of JointRegSegLib."""
