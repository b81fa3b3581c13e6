"""``python -m greentrainer``, ``torchrun … -m greentrainer train …``, ``accelerate launch -m greentrainer …``."""
import sys

from .cli import main

sys.exit(main())
