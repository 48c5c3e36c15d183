"""Build (or resume) the frozen-teacher cache once, for every later trial to reuse.

python jobs/build_cache.py [--config FILE] [key=value ...]
ray job submit --working-dir . -- python jobs/build_cache.py cache.teachers=[dinov3,text]
"""

import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))
