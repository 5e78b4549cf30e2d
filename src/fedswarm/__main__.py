import sys

from fedswarm.app.cli import main

sys.exit(main())
