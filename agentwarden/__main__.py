from agentwarden.cli import main

raise SystemExit(main())
