import sys

from vidret.cli import main

sys.exit(main())
