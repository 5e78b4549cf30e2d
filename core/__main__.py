import sys

from fedswarm.cli import main

sys.exit(main())
