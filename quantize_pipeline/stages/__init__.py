"""One module per stage. Each stage is a function (recipe, inputs) -> outputs in its own folder."""
