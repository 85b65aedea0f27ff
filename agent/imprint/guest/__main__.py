import sys

from imprint.guest.cli import main

sys.exit(main())
