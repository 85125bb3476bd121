import sys

from benchmarks.zoo import main

sys.exit(main())
