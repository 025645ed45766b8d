"""`python -m verify`: same as `lorabox verify`."""

import sys

from verify.cli import main

sys.exit(main())
