"""A request body's field may not share its name with an app dependency.

Litestar files a validation error under the field's name and treats an error whose name
is a dependency's as a server fault: `{"tools": {}}` on the chat route once answered 500
instead of a 400 naming `tools`, because the tool service was injected as `tools`."""

from __future__ import annotations

import msgspec

from services.orchestrator.app import create_app
from shared.infra.settings import Settings


def test_no_body_field_is_named_like_a_dependency() -> None:
    app = create_app(Settings())
    dependencies = set(app.dependencies)
    clashes = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            data = handler.parsed_fn_signature.parameters.get("data")
            body = getattr(data, "annotation", None)
            if isinstance(body, type) and issubclass(body, msgspec.Struct):
                clashes += [(route.path, name) for name in body.__struct_fields__
                            if name in dependencies]
    assert not clashes, f"body fields named like dependencies: {clashes}"
