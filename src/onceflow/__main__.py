"""`python -m onceflow ...`: the same command as the `onceflow` console script."""

from ._cli import main

if __name__ == "__main__":
    main()
