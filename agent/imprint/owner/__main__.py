import sys

from imprint.owner.cli import main

sys.exit(main())
