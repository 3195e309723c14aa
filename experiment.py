"""Train a teacher, distill a student, compare with a baseline: `python experiment.py --help`."""

from kd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
