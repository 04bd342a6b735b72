"""`python -m JointRegSegLib ...` (also what torchrun starts: `torchrun ... -m JointRegSegLib batch ...`)."""
from .cli import console_main

if __name__ == "__main__":
    console_main()
