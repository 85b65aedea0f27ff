import sys

from imprint.site.cli import main

sys.exit(main())
