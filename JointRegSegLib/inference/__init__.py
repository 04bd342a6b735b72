"""One Register & Segment run: pre-alignment (classical and learned affine), brain location, the networks'
registration and segmentation, refinement, segmentation fusion, full-resolution labels, the self-check and
the QC figures. Depends on `core`, `io` and `models`."""
