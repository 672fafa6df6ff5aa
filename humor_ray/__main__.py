from humor_ray.cli import main

raise SystemExit(main())
