from agentwarden.cli import main

main()
