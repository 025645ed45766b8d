"""`python -m train` (and `accelerate launch -m train`): one training run in this process."""

import sys

from train.run import main

sys.exit(main())
