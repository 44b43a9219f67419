"""`python -m m2skd ...` and `torchrun ... -m m2skd train-student RUN`."""
from m2skd.cli import main

if __name__ == "__main__":
    main(prog_name="m2skd")
