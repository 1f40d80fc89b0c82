import sys

from megablocks_ablate.cli import main

sys.exit(main())
