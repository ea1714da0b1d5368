"""`python -m cloudkvm` runs the CLI."""
from .cli import main

main()
