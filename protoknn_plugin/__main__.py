"""``python -m protoknn_plugin ...`` runs the CLI (torchrun uses this entry)."""
from .cli import main

if __name__ == "__main__":
    main()
