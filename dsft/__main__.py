import sys

from dsft.cli import main

sys.exit(main())
