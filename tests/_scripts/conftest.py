"""The scripts here run whole trainings when executed (under torchrun, or by a test through
runpy); pytest's --doctest-modules must not import them while collecting."""

collect_ignore_glob = ["*.py"]
