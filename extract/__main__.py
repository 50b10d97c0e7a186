from lare2.extract.cli import main

main()
