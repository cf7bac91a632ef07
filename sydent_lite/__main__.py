import sys

from sydent_lite.cli import main

sys.exit(main())
