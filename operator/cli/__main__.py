from xstilts.operator.cli.app import main

main()
