"""`python -m lateserve.gateway`."""

from lateserve.gateway.cli import main

if __name__ == "__main__":
    main()
