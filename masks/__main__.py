import sys

from masks.cli import main

sys.exit(main())
