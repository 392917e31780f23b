"""`python -m mlkd_cli` runs the command-line app."""

from mlkd_cli.cli import main

if __name__ == "__main__":
    main()
