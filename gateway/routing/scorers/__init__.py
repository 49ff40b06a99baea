"""Built-in scorers. Every module here is imported by `gateway.routing.registry`, so adding a
scorer is one new file with a `@register("name")` class."""
