"""Videos from a model: rendering (shared with validation), `cogft sample` and `cogft export`."""
