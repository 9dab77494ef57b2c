"""`python -m augbench <stage>`: see augbench.cli."""

from augbench.cli import main

if __name__ == "__main__":  # img2dataset spawns processes: the guard is required
    raise SystemExit(main())
