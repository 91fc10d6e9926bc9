"""``python -m timm_qsenn`` is the ``qsenn`` command."""

from .cli import main

if __name__ == "__main__":
    main()
