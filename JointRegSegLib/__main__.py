"""`python -m JointRegSegLib ...` (also what torchrun starts: `torchrun ... -m JointRegSegLib batch ...`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
