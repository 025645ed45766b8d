"""`python -m lorabox.train` (and `accelerate launch -m lorabox.train`): one training run in this process."""

import sys

from lorabox.train.run import main

sys.exit(main())
