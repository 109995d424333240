"""``python -m regrow`` runs the command-line interface."""

from regrow.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
