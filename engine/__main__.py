from engine.edges.cli import main

main()
