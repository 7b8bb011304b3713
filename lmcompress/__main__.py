from lmcompress.cli import run

run()
