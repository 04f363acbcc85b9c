import sys

from ligo_client.cli import main

sys.exit(main())
