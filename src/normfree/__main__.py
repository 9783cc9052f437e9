import sys

from normfree.cli import main

sys.exit(main())
