"""`python -m rlchat ...` (what `accelerate launch -m rlchat` runs)."""
from rlchat.cli import main

if __name__ == "__main__":
    main()
