"""The base of the JSON contracts (bench report, data manifest, gate decision): pydantic models
that write exactly the JSON the dicts they replace wrote."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Contract(BaseModel):
    """A JSON contract read forward-compatibly: unknown keys are kept, never refused (reports and
    manifests outlive the code that wrote them). Subclasses that must refuse them say why."""

    model_config = ConfigDict(extra="allow")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as written: keys in field order, unset optional keys left out."""
        return self.model_dump(mode="json", exclude_unset=True)


def first_error(e: ValidationError) -> str:
    """`key.path: what is wrong` of the first validation error, for a one-line message."""
    err = e.errors()[0]
    return f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}"
