"""``python -m softprompt_kernels.bench [options]``: the same as ``softprompt-kernels bench``."""
import sys

from . import main

sys.exit(main(sys.argv[1:]))
