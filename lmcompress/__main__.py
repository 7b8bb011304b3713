from lmcompress.cli import main

main()
