from lateserve.server.cli import main

main()
