"""The verify stage: the exported tensors' dtypes, scales and quantization_config against the recipe; export-to-export equality."""
