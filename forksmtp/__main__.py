from forksmtp.cli import main

raise SystemExit(main())
