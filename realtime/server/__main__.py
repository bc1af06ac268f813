from realtime.server.launcher import main

main()
