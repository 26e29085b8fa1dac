"""The installed versions a numeric result depends on, recorded beside it: a rerun that does not reproduce
it can then be told apart from one under other versions of the array stack."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

NUMERIC_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "faiss-cpu")


def package_versions(names=NUMERIC_PACKAGES) -> dict:
    """``{name: version}`` of each installed package of ``names`` (absent ones left out)."""
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
