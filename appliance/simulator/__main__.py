from appliance.simulator.main import main

raise SystemExit(main())
