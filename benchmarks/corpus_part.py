"""A smaller WikiText-format corpus for the memory benchmarks: the first part of train.txt's lines.

Written into a directory the caller owns (a temporary one); valid.txt and test.txt are linked, not
copied. Not a benchmark itself: ``build_memory.py`` and ``train_memory.py`` import it.
"""

import os


def first_lines(data_dir: str, fraction: float, directory: str) -> str:
    """``directory`` holding the first ``fraction`` of ``data_dir``'s train lines; returns it."""
    with open(os.path.join(data_dir, "train.txt")) as f:
        lines = f.readlines()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "train.txt"), "w") as f:
        f.writelines(lines[: round(len(lines) * fraction)])
    for split in ("valid", "test"):
        source = os.path.join(os.path.abspath(data_dir), f"{split}.txt")
        if os.path.isfile(source):
            os.symlink(source, os.path.join(directory, f"{split}.txt"))
    return directory
