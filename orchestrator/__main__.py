"""`python -m orchestrator` is `phi4`."""

from orchestrator.cli import main

if __name__ == "__main__":
    main()
