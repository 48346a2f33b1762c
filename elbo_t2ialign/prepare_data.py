"""Download the published datasets into datasets/ and check the layout: `python -m elbo_t2ialign.prepare_data`.

See elbo_t2ialign/segmentation/prepare.py and datasets/README.md.
"""

import sys

from elbo_t2ialign.segmentation.prepare import main

if __name__ == "__main__":
    sys.exit(main())
