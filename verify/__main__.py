"""`python -m lorabox.verify`: same as `lorabox verify`."""

import os
import sys

from lorabox.verify.cli import main

code = main()
# Tearing down torch, bitsandbytes and peft at interpreter exit costs 2-3 s on 2 cores, a quarter of the
# verifier's time budget; nothing is left to clean up once the report is written, so flush and leave.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
