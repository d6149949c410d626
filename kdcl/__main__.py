from kdcl.cli import main

main()
