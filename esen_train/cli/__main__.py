"""`python -m esen_train.cli ...` is `esen-train ...` (torchrun starts its processes this way)."""
import sys

from esen_train.cli.train import main

sys.exit(main())
