"""ddpmctl's built-in sampler plugins, registered as entry points exactly as a third party would."""
