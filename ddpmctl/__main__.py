"""``python -m ddpmctl`` (also what ``torchrun -m ddpmctl`` runs)."""

from ddpmctl.cli.app import main

if __name__ == "__main__":
    main()
