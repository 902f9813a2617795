from encfs.cli import main

raise SystemExit(main())
