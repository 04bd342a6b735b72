"""Models: the networks, checkpoints (safetensors weights + model card) and the installed models
(Resources/Models). Depends on `core` only."""
