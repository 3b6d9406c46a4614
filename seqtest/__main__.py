from seqtest.cli import main

main()
