"""``python -m llmproxy``: the same as the ``llmproxy`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="llmproxy")
