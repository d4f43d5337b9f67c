import sys

from hldx.bench import main

sys.exit(main())
