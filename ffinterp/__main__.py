"""``python -m ffinterp`` (what ``torchrun -m ffinterp`` runs)."""

from ffinterp.cli import main

if __name__ == "__main__":
    main()
