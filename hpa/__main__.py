from hpa.cli import main

raise SystemExit(main())
