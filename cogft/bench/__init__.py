"""Measurement tools: `cogft bench` (training step, validation video), the prepare and encode benchmarks,
and `cogft estimate`'s report. Each prints one JSON line per figure; nothing here is used by training."""
