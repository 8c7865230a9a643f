"""`python -m gpucheck`: see gpucheck/check.py."""
import sys

from gpucheck.check import main

sys.exit(main())
