"""`python -m nv_engine ...` is the `nv-engine` command."""

from nv_engine.entrypoints.cli import main

if __name__ == "__main__":  # (spawned engine and worker processes import this module again)
    raise SystemExit(main())
