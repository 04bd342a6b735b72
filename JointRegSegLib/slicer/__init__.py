"""The only code that knows 3D Slicer: the MRML adapter (`mrml`) and the warm worker process the module
runs the engine in (`worker`)."""
