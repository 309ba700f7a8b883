import sys

from dmvae.cli import main

sys.exit(main())
