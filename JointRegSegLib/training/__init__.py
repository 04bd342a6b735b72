"""Few-shot joint training of registration + segmentation networks (strategies from the seed papers)."""
