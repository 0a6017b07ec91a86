"""`python -m gpuledger.store PATH`: serve a chdb folder (see `gpuledger.store.server.main`)."""

import sys

from gpuledger.store.server import main

sys.exit(main())
